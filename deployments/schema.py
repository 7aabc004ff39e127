"""OpenAPI request schemas: what /openapi.json publishes (the parsers in
``deployments.protocol`` are the authority; a test checks the two agree)."""
from __future__ import annotations

from mepic_ray.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from mepic_ray.tier.documents import DOC_ID, MAX_METADATA_BYTES

_DOC_ID = {"type": "string", "pattern": f"^{DOC_ID.pattern}$"}

_SAMPLING_SCHEMA = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "seed": {"type": "integer", "minimum": 0},
    "stop": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS},
                       {"type": "array", "maxItems": MAX_STOP_STRINGS,
                        "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS}}],
             "description": f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters"},
    "n": {"type": "integer", "enum": [1]},
    "stream": {"type": "boolean"},
    "ignore_eos": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "chunks": {"type": "array", "description": "documents whose KV is cached and reused at any position: texts, "
               "or ids registered with POST /v1/chunks",
               "items": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "object", "required": ["chunk"],
                         "additionalProperties": False, "properties": {"chunk": {"type": "string", "minLength": 1},
                                                                       "public": {"type": "boolean"}}},
                                   {"type": "object", "required": ["id"], "additionalProperties": False,
                                    "properties": {"id": _DOC_ID}}]}},
}
# The parsers read null as "not given" for these fields (as OpenAI's API does): say so.
_NULL_MEANS_ABSENT = ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                      "stop", "ignore_eos", "stream_options", "chunks", "logprobs", "top_logprobs", "prefix",
                      "special_tokens")


def _nullable(props: dict) -> dict:
    return {k: {"anyOf": [v, {"type": "null"}]} if k in _NULL_MEANS_ABSENT else v for k, v in props.items()}


COMPLETION_SCHEMA = {"type": "object", "required": ["prompt"], "properties": {
    **_SAMPLING_SCHEMA,
    "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}]},
    "prefix": {"type": "string", "description": "text placed before the chunks"},
    "special_tokens": {"type": "boolean", "description": "tokenize control-token markers in prompt and prefix "
                                                         "as control tokens (default: as text)"}}}
COMPLETION_SCHEMA["properties"] = _nullable(COMPLETION_SCHEMA["properties"])
CHAT_SCHEMA = {"type": "object", "required": ["messages"], "properties": {
    **_SAMPLING_SCHEMA,
    "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "messages": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}}}}
CHAT_SCHEMA["properties"] = _nullable(CHAT_SCHEMA["properties"])


REGISTER_SCHEMA = {"type": "object", "required": ["documents"], "additionalProperties": False, "properties": {
    "warm": {"type": "boolean", "description": "also load the documents into every replica's KV pool"},
    "documents": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
        "type": "object", "required": ["text"], "additionalProperties": False, "properties": {
            "text": {"type": "string", "minLength": 1},
            "id": {**_DOC_ID, "description": "the name requests use: {\"id\": ...} in chunks (default: from the text)"},
            "metadata": {"type": "object", "description": f"kept with the document, at most {MAX_METADATA_BYTES} "
                                                          "bytes of JSON"},
            "public": {"type": "boolean", "description": "shared with every tenant"},
            "pin": {"type": "boolean",
                    "description": "never evicted from the tier (under chunk_store.pin_budget_bytes)"},
            "ttl_s": {"type": "number", "exclusiveMinimum": 0, "description": "how long the pin lasts (needs pin)"},
            "routes": {"type": "array", "minItems": 1, "uniqueItems": True,
                       "items": {"enum": ["completions", "chat"]},
                       "description": "the routes whose chunk form is compiled (default: both)"}}}}}}


def openapi_body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "the completion (or a text/event-stream when streaming)"},
                          "400": {"description": "invalid request"}, "401": {"description": "no valid API key"},
                          "404": {"description": "unknown model"}, "413": {"description": "body too large"},
                          "503": {"description": "overloaded or no replica available (Retry-After)"},
                          "504": {"description": "timed out"}}}
