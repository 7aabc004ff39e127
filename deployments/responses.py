"""OpenAI response bodies and server-sent events from the replicas' items."""
from __future__ import annotations

import json
import time

from deployments.protocol import chat_logprobs, completion_logprobs


class Responses:
    def __init__(self, tokenizer, model_name: str):
        self.tokenizer, self.model_name = tokenizer, model_name

    @staticmethod
    def usage(u: dict) -> dict:
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]},
                # How the prompt's KV was obtained (reused chunks still recompute their first
                # block), and where each distinct chunk's pages came from.
                "mepic": {k: u[k] for k in ("recomputed_tokens", "compiled_tokens", "loaded_tokens",
                                            "chunks_pool", "chunks_store", "chunks_miss", "resumed_tokens")}}

    def logprobs(self, chat: bool, entries: list | None, text_offset: int = 0) -> dict | None:
        if entries is None:
            return None
        return chat_logprobs(entries, self.tokenizer) if chat else completion_logprobs(entries, self.tokenizer,
                                                                                          text_offset)

    def body(self, rid: str, chat: bool, text: str, last: dict, logprobs: list | None = None) -> dict:
        usage = self.usage(last["usage"])
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text})
        choice["logprobs"] = self.logprobs(chat, logprobs)
        choice["finish_reason"] = last["finish_reason"]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": usage}

    async def sse(self, rid: str, chat: bool, items, run, include_usage: bool = False):
        try:
            async for event in self._events(rid, chat, items, include_usage):
                yield event
        finally:    # also when the client hung up: the replica aborts the request, freeing its pages
            run.gen.cancel()

    async def _events(self, rid: str, chat: bool, items, include_usage: bool):
        offset = 0
        async for item in items:
            if item.get("error"):
                yield f"data: {json.dumps({'error': {'message': item['error'], 'type': 'server_error'}})}\n\n"
                break
            delta = {"content": item["delta"]} if chat else None
            choice = {"index": 0, "finish_reason": item["finish_reason"],
                      **({"delta": delta} if chat else {"text": item["delta"]}),
                      "logprobs": self.logprobs(chat, item.get("logprobs"), offset)}
            offset += sum(len(t) for t in (choice["logprobs"] or {}).get("tokens", []))
            chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": self.model_name, "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n"
            if item["finished"] and include_usage:
                usage = {**chunk, "choices": [], "usage": self.usage(item["usage"])}
                yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
