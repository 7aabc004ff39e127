"""Turns each sampled token into the request's text: detokenize, apply stop tokens and
stop strings, hold back what may still change, and decide whether the request is done."""
from __future__ import annotations

from dataclasses import dataclass

from mepic_ray.core.request import Request, RequestStats


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    delta_text: str
    delta_token_ids: list[int]
    stats: RequestStats
    error: str | None = None
    delta_logprobs: list | None = None    # sampler.Logprob of this step's token, when asked
    logprobs: list | None = None          # all of them, on the final output

    def __getattr__(self, name):   # out.ttft_s, out.cached_tokens, ...
        if name != "stats" and hasattr(self.stats, name):
            return getattr(self.stats, name)
        raise AttributeError(name)


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len

    def process(self, req: Request) -> RequestOutput:
        """After ``req`` got a new token: set ``req.text`` and ``req.finish_reason``."""
        p, tok = req.params, req.output_ids[-1]
        prev_text = req.text
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        if not p.ignore_eos and tok in self.eos_ids or tok in p.stop_token_ids:
            req.finish_reason = "stop"
        for s in p.stop:
            i = text.find(s)
            if i >= 0:
                text, req.finish_reason = text[:i], "stop"
        if req.finish_reason is None and (len(req.output_ids) >= p.max_tokens or req.num_slots >= self.max_model_len):
            req.finish_reason = "length"
        finished = req.finish_reason is not None
        if not finished:
            # Hold back a trailing U+FFFD (the first bytes of a character whose other bytes
            # come with later tokens) and a tail that may still grow into a stop string:
            # what is streamed must stay a prefix of the final text.
            text = text.rstrip("\ufffd")
            hold = max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if finished or text.startswith(prev_text):
            req.text = text
        delta = req.text[len(prev_text):] if req.text.startswith(prev_text) else ""
        asked = p.logprobs is not None
        return RequestOutput(req.request_id, req.text, list(req.output_ids), finished, req.finish_reason,
                             delta, [tok], req.stats, delta_logprobs=req.logprobs[-1:] if asked else None,
                             logprobs=list(req.logprobs) if asked and finished else None)
