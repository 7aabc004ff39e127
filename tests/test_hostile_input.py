"""Hostile input against the real service: every bad body gets a 4xx with a reason,
nothing gets a 5xx, and no KV page leaks (the pool is whole again afterwards).
Hand-picked cases, a hypothesis fuzzer over request bodies, and schemathesis
against the service's own OpenAPI schema."""
import json
import math
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import deploy_one_tiny_replica, start_local_serve

ray = pytest.importorskip("ray")

SEP = " # # "



@pytest.fixture(scope="module")
def service(tiny_model_dir):
    from ray import serve
    url = start_local_serve(2)
    # One replica, so the stats route always reports the pool the requests used; a short
    # context keeps valid fuzzed requests quick.
    deploy_one_tiny_replica(tiny_model_dir, {"max_body_bytes": 2**20, "request_timeout_s": 60})
    yield url
    serve.shutdown()
    ray.shutdown()


def send(base, body, path="/v1/completions", raw=False) -> httpx.Response:
    data = body if raw else json.dumps(body, allow_nan=True)
    return httpx.post(base + path, content=data, headers={"content-type": "application/json"}, timeout=120)


def check_reply(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error"


def pool_is_whole(base) -> dict:
    deadline = time.time() + 30
    while True:
        s = httpx.get(base + "/v1/mepic/stats", timeout=30).json()
        if s["used_blocks"] == 0 and s["running"] + s["waiting"] == 0:
            return s
        assert time.time() < deadline, f"pages or requests left behind: {s}"
        time.sleep(0.2)


CASES = {
    "huge prompt over the body limit": ({"prompt": "x" * (2 * 2**20)}, 413),
    "prompt longer than the context": ({"prompt": "word " * 2000}, 400),
    "thousands of tiny chunks": ({"prompt": "q", "chunks": ["a"] * 3000}, 400),
    "empty chunk": ({"prompt": "q", "chunks": [""]}, 400),
    "chunk of only the separator": ({"prompt": "q", "chunks": [SEP]}, 400),
    "chunk of separator marks": ({"prompt": "q", "chunks": [SEP.strip()]}, 200),   # "# #" is ordinary text
    "prompt of only separators": ({"prompt": SEP * 4}, 400),
    "lone surrogate": ({"prompt": "abc\ud800def"}, 400),
    "lone surrogate in a chunk": ({"prompt": "q", "chunks": ["\udfff"]}, 400),
    "max_tokens 0": ({"prompt": "q", "max_tokens": 0}, 400),
    "max_tokens enormous": ({"prompt": "q", "max_tokens": 10**30}, 200),
    "max_tokens 0 beside max_completion_tokens": ({"prompt": "q", "max_tokens": 0, "max_completion_tokens": 2}, 400),
    "negative temperature": ({"prompt": "q", "temperature": -0.5}, 400),
    "NaN temperature": ({"prompt": "q", "temperature": math.nan}, 400),
    "infinite top_p": ({"prompt": "q", "top_p": math.inf}, 400),
    "tiny temperature": ({"prompt": "q", "temperature": 1e-300, "max_tokens": 3}, 200),
    "negative seed": ({"prompt": "q", "seed": -1}, 400),
    "huge seed": ({"prompt": "q", "seed": 2**80}, 400),
    "huge top_k": ({"prompt": "q", "top_k": 10**9, "temperature": 1, "max_tokens": 3}, 200),
    "stop of wrong type": ({"prompt": "q", "stop": [1, 2]}, 400),
    "empty stop string": ({"prompt": "q", "stop": [""]}, 400),
    "prompt of wrong type": ({"prompt": {"a": 1}}, 400),
    "stream of wrong type": ({"prompt": "q", "stream": "yes"}, 400),
    "n > 1": ({"prompt": "q", "n": 3}, 400),
    "logprobs beyond 20": ({"prompt": "q", "logprobs": 21}, 400),
    "logprobs of wrong type": ({"prompt": "q", "logprobs": True}, 400),
    "presence_penalty (not implemented)": ({"prompt": "q", "presence_penalty": 0.5}, 400),
    "echo (not implemented)": ({"prompt": "q", "echo": True}, 400),
    "neutral values of unimplemented fields": ({"prompt": "q", "echo": False, "best_of": 1,
                                                "frequency_penalty": 0, "max_tokens": 2}, 200),
    "unicode edge cases": ({"prompt": "\u202e\u200b\x00 𝔘𝔫𝔦 e\u0301 \ufeff", "chunks": ["🦄" * 10], "max_tokens": 3},
                           200),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_picked_bad_input(service, name):
    body, status = CASES[name]
    r = send(service, body)
    check_reply(r)
    assert r.status_code == status, r.text[:300]


@pytest.mark.parametrize("extra", [{"top_logprobs": 2}, {"response_format": {"type": "json_object"}},
                                   {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}])
def test_unimplemented_or_inconsistent_chat_fields_are_refused(service, extra):
    r = send(service, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra},
             path="/v1/chat/completions")
    check_reply(r)
    assert r.status_code == 400 and r.json()["error"]["param"] in extra, r.text[:300]


def test_null_max_completion_tokens_means_not_given(service):
    r = send(service, {"prompt": "q", "max_tokens": 3, "max_completion_tokens": None, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text[:300]


@pytest.mark.parametrize("raw", [b"[" * 100000 + b"]" * 100000, b"\xff\xfe\x00garbage", b"", b"null", b"[1, 2]",
                                 b'{"prompt": "q", "max_tokens": 1e400}'])
def test_malformed_bodies(service, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = send(service, raw, path=path, raw=True)
        check_reply(r)
        assert r.status_code == 400


scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
           st.text(max_size=30) | st.sampled_from(["\ud800", SEP, "", " ", "\x00", "🦄"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
texts = st.text(max_size=80) | st.sampled_from(["\ud800x", SEP * 3, "   "])
completion_bodies = st.fixed_dictionaries({}, optional={
    "prompt": texts | json_values, "chunks": st.lists(texts, max_size=5) | json_values, "prefix": texts | json_values,
    "max_tokens": st.integers(-3, 10**20) | json_values, "temperature": st.floats() | json_values,
    "top_p": st.floats() | json_values, "top_k": st.integers(-3, 10**12), "seed": st.integers(-2**65, 2**65),
    "stop": texts | st.lists(texts, max_size=3) | json_values, "stream": st.booleans() | json_values,
    "model": st.sampled_from(["mepic", "other"]) | json_values, "ignore_eos": st.booleans() | json_values,
    "n": st.integers(-1, 3)})
chat_bodies = st.fixed_dictionaries({}, optional={
    "messages": st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool"]) | json_values,
        "content": texts | json_values}), max_size=3) | json_values,
    "chunks": st.lists(texts, max_size=3), "max_tokens": st.integers(-1, 8), "stream": st.booleans()})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=completion_bodies | json_values, chat=chat_bodies)
def test_fuzzed_bodies_never_500(service, body, chat):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = max(min(body["max_tokens"], 8), -1)     # keep valid requests quick
    check_reply(send(service, body))
    check_reply(send(service, chat, path="/v1/chat/completions"))


def test_no_pages_leak_after_the_fuzzing(service):
    s = pool_is_whole(service)
    assert s["free_blocks"] + s["idle_chunk_blocks"] == s["total_blocks"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_fuzz(service, path, mode):
    """Bodies generated by schemathesis from the service's published OpenAPI schema, valid
    and schema-violating: never a server error, and every violation refused with a 4xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import negative_data_rejection, not_a_server_error
    schema = schemathesis.openapi.from_url(service + "/openapi.json")
    operation = schema[path]["POST"]

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def run(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], 8)     # keep valid requests quick
        case.call_and_validate(base_url=service, checks=[not_a_server_error, negative_data_rejection])
    run()
