"""OpenAI request parsing and validation for the ingress (no torch here).

Chunks come either as the extension field ``chunks`` (documents: strings,
``{"chunk": text, "public": true}`` for every tenant's, or ``{"id": ...}`` for one
registered with ``POST /v1/chunks``; ``extra_body={"chunks": [...]}``
with the official client), placed after an optional ``prefix`` and before the prompt
(completions) or at the start of the last user message (chat), or inline with the separator.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from mepic_ray.sampling_params import SamplingParams, SamplingParamsError, check_stop
from mepic_ray.chat import CHUNK_TEMPLATE, render_chat
from mepic_ray.routing import PublicChunk, payload_items
from mepic_ray.segments import Chunk, PromptError, Text, split_prompt


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param
        self.retry_after = retry_after

    def response(self, retry_after: int | None = None) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        wait = retry_after or self.retry_after
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status,
                            headers={"retry-after": str(wait)} if wait else None)


@dataclass
class ParsedRequest:
    items: list            # markup str, {"text": user text} or {"chunk": text[, "public": true]} (mepic_ray.routing)
    sampling: dict
    stream: bool
    include_usage: bool = False    # stream_options.include_usage: a last chunk carries usage


def load_json(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"invalid JSON body: {e}")
    except RecursionError:
        raise ApiError("invalid JSON body: nested too deeply")


def _text(value: str, param: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(f"'{param}' is not valid Unicode text ({e.reason} at {e.start})", param=param)
    return value


def _typed(body: dict, key: str, types, default=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(f"'{key}' must be {types}", param=key)
    if not isinstance(v, types):
        raise ApiError(f"'{key}' has the wrong type ({type(v).__name__})", param=key)
    if isinstance(v, float) and not math.isfinite(v):
        raise ApiError(f"'{key}' must be finite", param=key)
    return v


# OpenAI fields this server does not implement, with the values that mean "off": any
# other value is refused, rather than answered as if the field were not there.
_UNSUPPORTED = {"echo": (None, False), "best_of": (None, 1),
                "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
                "response_format": (None, {"type": "text"})}


def _refuse_unsupported(body: dict) -> None:
    for key, off in _UNSUPPORTED.items():
        v = body.get(key)
        if not any(v is o or type(v) is type(o) and v == o for o in off):
            raise ApiError(f"'{key}' is not supported by this server (only {off[1]!r} or null)", param=key)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to report per token (None: no log-probabilities). Completions
    take ``logprobs: k``; chat takes ``logprobs: true`` and ``top_logprobs: k``."""
    if not chat:
        return _typed(body, "logprobs", int, None)
    top = _typed(body, "top_logprobs", int, None)
    if not _typed(body, "logprobs", bool, False):
        if top is not None:
            raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    return top or 0


def _sampling(body: dict, chat: bool = False) -> dict:
    _refuse_unsupported(body)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or isinstance(stop, list)
                                 and all(isinstance(x, str) for x in stop)):
        raise ApiError("'stop' must be a string or a list of strings", param="stop")
    try:   # the count and lengths first: nothing else looks at an oversized stop list
        check_stop(stop or [])
    except SamplingParamsError as e:
        raise ApiError(str(e), param="stop")
    for x in [stop] if isinstance(stop, str) else stop or []:
        _text(x, "stop")
    if body.get("n", 1) != 1:
        raise ApiError("only n=1 is supported", param="n")
    s = {"max_tokens": _typed(body, "max_tokens", int, 16),
         "temperature": float(_typed(body, "temperature", (int, float), 1.0)),
         "top_p": float(_typed(body, "top_p", (int, float), 1.0)),
         "top_k": _typed(body, "top_k", int, 0),
         "seed": _typed(body, "seed", int, None),
         "stop": [stop] if isinstance(stop, str) else (stop or []),
         "ignore_eos": bool(_typed(body, "ignore_eos", bool, False)),
         "logprobs": _logprobs(body, chat)}
    if body.get("max_completion_tokens") is not None:    # the newer name wins; null means not given
        if s["max_tokens"] < 1 and body.get("max_tokens") is not None:
            raise ApiError(f"max_tokens must be >= 1, got {s['max_tokens']}", param="max_tokens")
        s["max_tokens"] = _typed(body, "max_completion_tokens", int, 16)
    try:
        SamplingParams(**s)
    except SamplingParamsError as e:   # named as the client spelled it
        param = {"logprobs": "top_logprobs" if chat else "logprobs",
                 "max_tokens": "max_completion_tokens" if body.get("max_completion_tokens") is not None
                 else "max_tokens"}
        raise ApiError(str(e), param=param.get(e.param, e.param))
    except (ValueError, TypeError) as e:
        raise ApiError(str(e))
    return s


def _chunks(body: dict, separator: str, documents: dict | None = None) -> list[tuple[str, bool]]:
    """Each chunk's text and whether it is public; ``{"id": ...}`` names a registered
    document, whose text and scope ``documents`` (id -> (text, public)) holds."""
    chunks = body.get("chunks")
    if chunks is None:
        return []
    documents = documents or {}

    def one(c):
        if isinstance(c, str):
            return c, False
        if isinstance(c, dict) and set(c) <= {"chunk", "public"}:
            return c.get("chunk"), c.get("public", False)
        if isinstance(c, dict) and set(c) == {"id"} and c["id"] in documents:
            return documents[c["id"]]
        return None, None
    chunks = [one(c) for c in (chunks if isinstance(chunks, list) else [None])]
    if not all(isinstance(c, str) and isinstance(p, bool) for c, p in chunks):
        raise ApiError('\'chunks\' must be a list of strings, {"chunk": string, "public": boolean} or '
                       '{"id": registered document id}', param="chunks")
    for i, (c, _) in enumerate(chunks):
        _text(c, "chunks")
        if not c.strip():
            raise ApiError(f"chunk {i} is empty", param="chunks")
        if separator in c:
            raise ApiError(f"chunk {i} contains the separator {separator!r}", param="chunks")
    return chunks


def _common(body, model_name: str) -> None:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(f"model {model!r} does not exist (serving {model_name!r})", status=404,
                       code="model_not_found", param="model")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError("'stream' must be a boolean", param="stream")


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError("'stream_options' must be an object with a boolean 'include_usage'", param="stream_options")
    return opts.get("include_usage", False)


def _items(items: list) -> list:
    if not any((x if isinstance(x, str) else x.text).strip() for x in items):
        raise ApiError("the prompt is empty", param="prompt")
    return payload_items(items)


def parse_completion(body, model_name: str, separator: str, tokenizer, documents: dict | None = None) -> ParsedRequest:
    _common(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError("'prompt' must be a string (one prompt per request)", param="prompt")
    prefix = _text(_typed(body, "prefix", str, ""), "prefix")
    _text(prompt, "prompt")
    chunks = _chunks(body, separator, documents)
    # The client's text is text: control-token markers in it are tokenized as characters,
    # unless it asks for them ("special_tokens": true, for prompts it wrote itself).
    as_text = not _typed(body, "special_tokens", bool, False)
    wrap = Text if as_text else str
    try:
        items = ([wrap(prefix), *((PublicChunk if p else Chunk)(c) for c, p in chunks), wrap(prompt)] if chunks
                 else split_prompt(prompt, separator, as_text=as_text))
    except PromptError as e:
        raise ApiError(str(e), param="prompt")
    return ParsedRequest(_items(items), _sampling(body), body.get("stream", False), _include_usage(body))


def parse_chat(body, model_name: str, separator: str, tokenizer, chunk_template: str = CHUNK_TEMPLATE,
               documents: dict | None = None) -> ParsedRequest:
    _common(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(f"message {i} needs a role (system, user, assistant) and string content",
                           param="messages")
        _text(m["content"], "messages")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    chunks = _chunks(body, separator, documents)
    if chunks and not any(m["role"] == "user" for m in messages):
        raise ApiError("'chunks' needs a user message to attach to", param="chunks")
    try:
        items = render_chat(tokenizer, messages, separator, [chunk_template.replace("{chunk}", c) for c, _ in chunks])
    except PromptError as e:
        raise ApiError(str(e), param="messages")
    # By text: a text marked public is public wherever this request holds it.
    public = {chunk_template.replace("{chunk}", c) for c, p in chunks if p}
    items = [PublicChunk(x.text) if type(x) is Chunk and x.text in public else x for x in items]
    return ParsedRequest(_items(items), _sampling(body, chat=True), body.get("stream", False), _include_usage(body))


# -- log-probabilities in OpenAI's two shapes; entries are [token id, logprob, [[id, logprob], ...]] --
def completion_logprobs(entries: list, tokenizer, text_offset: int = 0) -> dict:
    tokens = [tokenizer.decode([tok]) for tok, _, _ in entries]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    tops = []
    for _, _, top in entries:    # keyed by text: of ids that decode alike, the likelier one stays
        tops.append({})
        for t, v in top:
            tops[-1].setdefault(tokenizer.decode([t]), v)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(entries: list, tokenizer) -> dict:
    def one(tok: int, lp: float) -> dict:
        s = tokenizer.decode([tok])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**one(tok, lp), "top_logprobs": [one(t, v) for t, v in top]} for tok, lp, top in entries]}
