"""The document API on the real service (Ray Serve, HTTP on 127.0.0.1, two replicas
of the tiny model over the object-store tier, two tenants): documents registered
ahead of traffic serve their first request without a compile, by id, in their
tenant's scope; pins hold in the tier; bad input gets a 4xx with a reason, and an
interrupted registration leaves all of its documents or none.

References: token counts from the document itself (the tiny model's tokenizer is
byte-level with no merges, so an ASCII document of n characters is n tokens), and
answers from the same request with the document's text sent inline."""
import json
import time
import uuid

import httpx
import pytest

from helpers import affinity_router, start_local_serve

ray = pytest.importorskip("ray")

KEY_A, KEY_B = "sk-Tenant-A-0123456789abcdef", "sk-Tenant-B-0123456789abcdef"
GREEDY = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
STORE_BUDGET, PIN_BUDGET = 400_000, 150_000     # bytes; the tiny model's KV is 512 bytes per token


def text(tag: str, n: int) -> str:
    """An ASCII document of exactly n characters (n tokens)."""
    return (f"[{tag}] " + "the harbour cranes lift containers onto ships; " * 20)[:n]


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    from ray import serve
    from deployments.app import EngineServer, OpenAIIngress
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": {KEY_A: "team-a", KEY_B: "team-b"}}))
    url = start_local_serve(2)
    store = {"name": f"docs-{uuid.uuid4().hex[:8]}", "budget_bytes": STORE_BUDGET, "pin_budget_bytes": PIN_BUDGET,
             "warm_poll_s": 0.2, "load_policy": "always"}
    engine = EngineServer.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5},
                                  request_router_config=affinity_router()).bind(
        {"mode": "mepic", "block_size": 8, "num_blocks": 512, "max_model_len": 256, "model": tiny_model_dir},
        store, None)
    serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.2}).bind(
        engine, "mepic", tiny_model_dir, {"api_keys_file": str(keys), "request_timeout_s": 60}),
        name="mepic", route_prefix="/")
    yield url
    serve.shutdown()
    ray.kill(ray.get_actor(store["name"], namespace="mepic"))
    ray.shutdown()


def call(base, key, method, path, body=None, timeout=60) -> httpx.Response:
    return httpx.request(method, base + path, json=body, timeout=timeout,
                         headers={"authorization": f"Bearer {key}"} if key else {})


def complete(base, key, chunk, path="/v1/completions") -> dict:
    body = ({"prompt": "\nQ: what do the cranes lift?\nA:", "chunks": [chunk]} if path == "/v1/completions" else
            {"messages": [{"role": "user", "content": "What do the cranes lift?"}], "chunks": [chunk]})
    r = call(base, key, "POST", path, {**body, **GREEDY})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def answer(reply: dict) -> str:
    c = reply["choices"][0]
    return c["text"] if "text" in c else c["message"]["content"]


def wait_warm(base, key, doc_id, replicas=2, timeout_s=60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = call(base, key, "GET", f"/v1/chunks/{doc_id}").json()
        if d["warm_replicas"] >= replicas:
            return d
        time.sleep(0.2)
    raise AssertionError(f"{doc_id} warmed on {d['warm_replicas']} replicas, not {replicas}")


def store_stats(service) -> dict:
    from ray import serve
    info = serve.get_deployment_handle("EngineServer", "mepic").model_info.remote().result()["store"]
    return ray.get(ray.get_actor(info["name"], namespace=info["namespace"]).stats.remote())


def test_a_registered_document_serves_its_first_request_without_a_compile(service):
    doc = text("manual", 120)
    r = call(service, KEY_A, "POST", "/v1/chunks", {"documents": [{"text": doc, "id": "manual",
                                                                   "metadata": {"src": "wiki"}}], "warm": True})
    assert r.status_code == 200, r.text[:300]
    (d,) = r.json()["data"]
    assert (d["id"], d["tokens"], d["status"], d["stored"], d["metadata"]) == ("manual", 120, "registered", True,
                                                                               {"src": "wiki"})
    assert d["routes"] == ["chat", "completions"] and "hash" not in json.dumps(d)
    wait_warm(service, KEY_A, "manual")
    for path in ("/v1/completions", "/v1/chat/completions"):
        by_id = complete(service, KEY_A, {"id": "manual"}, path)
        u = by_id["usage"]
        assert u["mepic"]["compiled_tokens"] == 0 and u["mepic"]["chunks_pool"] == 1, u
        inline = complete(service, KEY_A, doc, path)     # the same prompt, the text sent itself
        assert answer(by_id) == answer(inline) and inline["usage"]["prompt_tokens"] == u["prompt_tokens"]


def test_without_warm_the_first_use_loads_from_the_tier(service):
    r = call(service, KEY_A, "POST", "/v1/chunks", {"documents": [{"text": text("cold", 100), "id": "cold"}]})
    assert r.status_code == 200 and r.json()["data"][0]["warm_replicas"] == 0
    u = complete(service, KEY_A, {"id": "cold"})["usage"]["mepic"]
    assert u["compiled_tokens"] == 0 and u["chunks_pool"] + u["chunks_store"] == 1, u


def test_tenants_see_only_their_own_documents_and_public_ones(service):
    for key, tag in ((KEY_A, "a"), (KEY_B, "b")):    # one id, a document in each tenant's scope
        r = call(service, key, "POST", "/v1/chunks", {"documents": [{"text": text(f"faq-{tag}", 90), "id": "faq"}]})
        assert r.status_code == 200, r.text[:300]
    r = call(service, KEY_A, "POST", "/v1/chunks",
             {"documents": [{"text": text("handbook", 110), "id": "handbook", "public": True}], "warm": True})
    assert r.status_code == 200 and r.json()["data"][0]["public"] is True
    wait_warm(service, KEY_B, "handbook")
    u = complete(service, KEY_B, {"id": "handbook"})["usage"]["mepic"]
    assert u["compiled_tokens"] == 0 and u["chunks_pool"] == 1, u
    seen_b = {d["id"] for d in call(service, KEY_B, "GET", "/v1/chunks").json()["data"]}
    assert "manual" not in seen_b and {"faq", "handbook"} <= seen_b
    assert call(service, KEY_B, "GET", "/v1/chunks/manual").status_code == 404
    r = call(service, KEY_B, "POST", "/v1/completions", {"prompt": "x", "chunks": [{"id": "manual"}], **GREEDY})
    assert r.status_code == 404 and "manual" in r.json()["error"]["message"]
    faq_b = complete(service, KEY_B, {"id": "faq"})
    assert faq_b["usage"]["prompt_tokens"] == complete(service, KEY_B, text("faq-b", 90))["usage"]["prompt_tokens"]
    assert call(service, KEY_B, "DELETE", "/v1/chunks/handbook").status_code == 403
    for key in (None, "sk-not-a-key-0123456789abc"):
        for method, path in (("GET", "/v1/chunks"), ("POST", "/v1/chunks"), ("GET", "/v1/chunks/faq"),
                             ("DELETE", "/v1/chunks/faq")):
            r = call(service, key, method, path, {"documents": [{"text": "t"}]} if method == "POST" else None)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_pinned_documents_stay_in_the_tier_while_others_are_evicted(service):
    r = call(service, KEY_A, "POST", "/v1/chunks", {"documents": [
        {"text": text("pinned", 100), "id": "pinned", "pin": True},
        {"text": text("unpinned", 100), "id": "unpinned"}]})
    assert r.status_code == 200 and [d["pinned"] for d in r.json()["data"]] == [True, False]
    for i in range(12):    # new chunks written through to the store, well past its budget
        complete(service, KEY_A, text(f"flood {i}", 200))
    stats = store_stats(service)
    assert stats["evictions"] > 0 and stats["bytes_used"] <= STORE_BUDGET
    assert call(service, KEY_A, "GET", "/v1/chunks/pinned").json()["stored"] is True
    assert call(service, KEY_A, "GET", "/v1/chunks/unpinned").json()["stored"] is False
    # Over the pin budget: refused whole, naming the budget.
    r = call(service, KEY_A, "POST", "/v1/chunks", {"documents": [
        {"text": text("small", 40), "id": "small", "pin": True}, {"text": text("big", 200), "id": "big", "pin": True}]})
    assert r.status_code == 409 and f"{PIN_BUDGET} bytes" in r.json()["error"]["message"]
    assert {"small", "big"}.isdisjoint(d["id"] for d in call(service, KEY_A, "GET", "/v1/chunks").json()["data"])
    # Deleting a pinned document frees its bytes in the tier and its id everywhere.
    pinned_before = store_stats(service)["pinned_bytes"]
    assert call(service, KEY_A, "DELETE", "/v1/chunks/pinned").json() == {"id": "pinned", "object": "chunk",
                                                                         "deleted": True}
    assert store_stats(service)["pinned_bytes"] < pinned_before
    assert call(service, KEY_A, "GET", "/v1/chunks/pinned").status_code == 404
    r = call(service, KEY_A, "POST", "/v1/completions", {"prompt": "x", "chunks": [{"id": "pinned"}], **GREEDY})
    assert r.status_code == 404


@pytest.mark.parametrize("body, status, reason", [
    ({"documents": [{"text": ""}]}, 400, "non-empty string"),
    ({"documents": [{"text": text("long", 240) * 2}]}, 400, "cannot be compiled"),   # over max_model_len tokens
    ({"documents": [{"text": "other text", "id": "manual"}]}, 409, "other text"),
    ({"documents": [{"text": "t", "id": "a/b"}]}, 400, "'id' must match"),
    ({"documents": "nope"}, 400, "non-empty list"),
])
def test_bad_registrations_get_a_4xx_with_a_reason(service, body, status, reason):
    call(service, KEY_A, "POST", "/v1/chunks", {"documents": [{"text": text("manual", 120), "id": "manual"}]})
    before = store_stats(service)["num_documents"]
    r = call(service, KEY_A, "POST", "/v1/chunks", body)
    assert r.status_code == status and reason in r.json()["error"]["message"], r.text[:300]
    assert store_stats(service)["num_documents"] == before


def test_unknown_ids_get_404(service):
    for method, path in (("GET", "/v1/chunks/nothing-here"), ("DELETE", "/v1/chunks/nothing-here")):
        r = call(service, KEY_A, method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "document_not_found"
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = call(service, KEY_A, "POST", path, {"prompt": "x", "messages": [{"role": "user", "content": "x"}],
                                                "chunks": [{"id": "nothing-here"}], **GREEDY})
        assert r.status_code == 404 and "nothing-here" in r.json()["error"]["message"]


def test_an_interrupted_registration_leaves_all_or_none(service):
    docs = [{"text": text(f"batch {i}", 200), "id": f"batch-{i}"} for i in range(16)]
    # Compiling 16 documents takes about 0.3 s on a fast CPU: the client gives up well before.
    with pytest.raises(httpx.TimeoutException):
        call(service, KEY_A, "POST", "/v1/chunks", {"documents": docs}, timeout=0.1)
    deadline, seen = time.monotonic() + 30, None
    while time.monotonic() < deadline:     # until the registration has settled either way
        ids = {d["id"] for d in call(service, KEY_A, "GET", "/v1/chunks").json()["data"]} & {d["id"] for d in docs}
        if ids == seen:
            break
        seen = ids
        time.sleep(2)
    assert seen in (set(), {d["id"] for d in docs})
    r = call(service, KEY_A, "POST", "/v1/chunks", {"documents": docs})
    assert r.status_code == 200 and len(r.json()["data"]) == 16
    assert {d["status"] for d in r.json()["data"]} == ({"exists"} if seen else {"registered"})
