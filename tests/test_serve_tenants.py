"""Tenants on the real service (Ray Serve and HTTP on 127.0.0.1, the tiny model, one
replica so every request shares one pool): API keys are checked on every /v1 route,
one tenant's documents and prompt text never serve another, public documents serve
all, and nothing another tenant can fetch holds another tenant's hashes or texts.

Expected token counts come from the document itself: the tiny model's tokenizer is
byte-level with no merges, so an ASCII document of n characters is n tokens."""
import json

import httpx
import pytest

from helpers import deploy_one_tiny_replica, start_local_serve
from mepic_ray.chat import CHUNK_TEMPLATE

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

KEY_A, KEY_B = "sk-Tenant-A-0123456789abcdef", "sk-Tenant-B-0123456789abcdef"
SECRET = "the secret plan of tenant A: ship the harbour cranes north in May"     # A's private document
PUBLIC = "a public handbook page about harbours, shared with every tenant"
GREEDY = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    from ray import serve
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": {KEY_A: "team-a", KEY_B: "team-b"}}))
    url = start_local_serve(2)
    deploy_one_tiny_replica(tiny_model_dir, {"api_keys_file": str(keys), "request_timeout_s": 60})
    yield url
    serve.shutdown()
    ray.shutdown()


class Tenant:
    """One tenant's client: every response it gets is kept, to search for leaks."""

    def __init__(self, base: str, key: str | None):
        self.base, self.key, self.seen = base, key, []

    def call(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
        r = httpx.request(method, self.base + path, json=body, headers=headers, timeout=60)
        self.seen.append(r.text + json.dumps(dict(r.headers)))
        return r

    def complete(self, chunk, prompt: str = "\nQ: where?\nA:", path="/v1/completions") -> dict:
        body = ({"prompt": prompt, "chunks": [chunk]} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": prompt}], "chunks": [chunk]})
        r = self.call("POST", path, {**body, **GREEDY})
        assert r.status_code == 200, r.text[:300]
        return r.json()["usage"]


def usage_line(u: dict) -> tuple:
    return u["prompt_tokens_details"]["cached_tokens"], u["mepic"]["compiled_tokens"], u["mepic"]["chunks_pool"]


def resident_chunks() -> set[str]:
    """The chunk hashes the replica holds, all tenants' (what it reports to the router)."""
    from ray import serve
    return set(serve.get_deployment_handle("EngineServer", "mepic").record_routing_stats.remote().result()["chunks"])


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", "/v1/mepic/stats"),
                                          ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")])
@pytest.mark.parametrize("key, reason", [(None, "missing API key"), ("sk-not-a-key-0123456789abc", "invalid API key"),
                                         (KEY_A[:-1], "invalid API key")])
def test_every_v1_route_needs_a_valid_key(service, method, path, key, reason):
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = Tenant(service, key).call(method, path, body if method == "POST" else None)
    assert r.status_code == 401, r.text[:300]
    err = r.json()["error"]
    assert reason in err["message"] and err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer" and "x-mepic-replica" not in r.headers
    assert (key or "unused") not in r.text


def test_health_needs_no_key(service):
    assert httpx.get(service + "/health", timeout=30).json() == {"status": "ok"}


def test_the_openai_client_sends_its_api_key(service):
    good = openai.OpenAI(base_url=service + "/v1", api_key=KEY_A, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == ["mepic"]
    bad = openai.OpenAI(base_url=service + "/v1", api_key="sk-wrong-0123456789abcdef", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="mepic", prompt="hi", max_tokens=1)
    assert e.value.status_code == 401 and "invalid API key" in str(e.value)


def test_another_tenants_document_is_compiled_not_reused(service):
    a, b = Tenant(service, KEY_A), Tenant(service, KEY_B)
    before = resident_chunks()
    cached, compiled, pool = usage_line(a.complete(SECRET))
    assert compiled == len(SECRET) and pool == 0
    mine = resident_chunks() - before
    assert len(mine) == 1                                        # A's copy of the document
    cached, compiled, pool = usage_line(a.complete(SECRET))      # A again: reused
    assert cached > 0 and compiled == 0 and pool == 1
    cached, compiled, pool = usage_line(b.complete(SECRET))      # B: its own copy, from nothing
    assert (cached, compiled, pool) == (0, len(SECRET), 0)
    assert len(resident_chunks() - before - mine) == 1
    cached, compiled, pool = usage_line(b.complete(SECRET, path="/v1/chat/completions"))
    assert cached == 0 and compiled == len(CHUNK_TEMPLATE.replace("{chunk}", SECRET))   # placed: another chunk
    # Nothing B got back holds A's document or the hash of A's copy.
    b.call("GET", "/v1/mepic/stats")
    b.call("GET", "/v1/models")
    b.call("POST", "/v1/completions", {"prompt": "x", "chunks": [{"chunk": SECRET, "public": "no"}]})  # a 400
    b.call("POST", "/v1/completions", {"prompt": "x", "chunks": [SECRET], "stream": True,
                                       "stream_options": {"include_usage": True}, **GREEDY})
    for text in b.seen:
        assert not any(h in text for h in mine) and SECRET[:20] not in text


def test_prompt_text_is_not_shared_across_tenants(service):
    """The prefix-cache chain is rooted at the tenant's namespace too: the same long
    prompt text (no chunks) is cached for its tenant only."""
    a, b = Tenant(service, KEY_A), Tenant(service, KEY_B)
    prompt = "A long system prompt of tenant A, several blocks of text before the question. Q: why? A:"
    first, second, other = (t.call("POST", "/v1/completions", {"prompt": prompt, **GREEDY}).json()["usage"]
                            for t in (a, a, b))
    assert first["prompt_tokens"] == len(prompt)
    assert second["prompt_tokens_details"]["cached_tokens"] >= len(prompt) - 16    # all but the last blocks
    assert other["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_public_document_serves_every_tenant(service):
    a, b = Tenant(service, KEY_A), Tenant(service, KEY_B)
    before = resident_chunks()
    cached, compiled, pool = usage_line(a.complete({"chunk": PUBLIC, "public": True}))
    assert compiled == len(PUBLIC) and pool == 0
    assert len(resident_chunks() - before) == 1
    cached, compiled, pool = usage_line(b.complete({"chunk": PUBLIC, "public": True}, prompt="\nQ: other?\nA:"))
    assert cached > 0 and compiled == 0 and pool == 1            # B reuses what A compiled
    cached, compiled, pool = usage_line(b.complete(PUBLIC))      # not marked public: B's own chunk
    assert (cached, compiled, pool) == (0, len(PUBLIC), 0)
    # The chat route, through the official client: one tenant compiles, the other reuses.
    chunk = {"chunk": PUBLIC + " (chat)", "public": True}
    usages = []
    for key in (KEY_B, KEY_A):
        c = openai.OpenAI(base_url=service + "/v1", api_key=key, max_retries=0, timeout=60)
        r = c.chat.completions.create(model="mepic", messages=[{"role": "user", "content": "Q: where?"}],
                                      max_tokens=2, temperature=0, extra_body={"chunks": [chunk], "ignore_eos": True})
        usages.append(r.usage.model_dump())
    assert usages[0]["mepic"]["compiled_tokens"] == len(CHUNK_TEMPLATE.replace("{chunk}", chunk["chunk"]))
    assert usages[0]["mepic"]["chunks_pool"] == 0
    assert usages[1]["mepic"]["compiled_tokens"] == 0 and usages[1]["mepic"]["chunks_pool"] == 1
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0


def test_stats_show_counts_only(service):
    r = Tenant(service, KEY_B).call("GET", "/v1/mepic/stats")
    s = r.json()
    assert r.status_code == 200 and s.pop("replica") == r.headers["x-mepic-replica"]
    store = s.pop("store")     # the replica's object-store tier counters, or None without one
    assert s and all(type(v) is int for v in s.values()), s
    assert store is None or all(type(v) is int for v in store.values()), store


def test_a_malformed_key_file_fails_the_deployment_with_its_reason(service, tiny_model_dir, tmp_path):
    """A second ingress (no engine: it refuses before needing one) with a broken file."""
    from ray import serve
    from deployments.app import OpenAIIngress
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": {"%s": "team-a",}}' % KEY_A)     # a trailing comma
    app = OpenAIIngress.options(ray_actor_options={"num_cpus": 0.1}, max_constructor_retry_count=1).bind(
        None, "mepic", tiny_model_dir, {"api_keys_file": str(bad)})
    with pytest.raises(RuntimeError, match="badkeys failed"):
        serve.run(app, name="badkeys", route_prefix="/bad")
    message = serve.status().applications["badkeys"].deployments["OpenAIIngress"].message   # what serve status shows
    serve.delete("badkeys")
    assert "ApiKeyError" in message and "not JSON" in message and str(bad) in message, message
    assert KEY_A not in message
