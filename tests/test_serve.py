"""The Ray Serve app for real: local Ray, two engine replicas, the chunk router,
HTTP on 127.0.0.1, the official openai client. Answers are checked against the
offline engine; routing against the replica header."""
import json

import httpx
import pytest

from helpers import affinity_router, free_port, start_local_serve

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from mepic_ray import LLM, Chunk, SamplingParams  # noqa: E402

ENGINE = {"mode": "mepic", "block_size": 8, "num_blocks": 4096}
DOCS = ["alpha document about rivers and their long history",
        "beta document about mountains, snow and the cold",
        "gamma document about deserts and the hot sand"]


service_metrics_port = [0]



@pytest.fixture(scope="module")
def service(tiny_model_dir):
    from ray import serve
    from deployments.app import EngineServer, OpenAIIngress
    metrics_port = free_port()
    url = start_local_serve(2, _metrics_export_port=metrics_port)
    router = affinity_router()
    # Loading from the store always: the tiny model compiles a chunk faster than a fetch.
    store = {"name": "test_store", "load_policy": "always"}
    engine = EngineServer.options(num_replicas=2, request_router_config=router,
                                  ray_actor_options={"num_cpus": 0.4}).bind({**ENGINE, "model": tiny_model_dir}, store)
    app = OpenAIIngress.options(ray_actor_options={"num_cpus": 0.2}).bind(engine, "mepic", tiny_model_dir)
    serve.run(app, name="mepic", route_prefix="/")
    service_metrics_port[0] = metrics_port
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    return LLM(tiny_model_dir, **ENGINE)


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


GREEDY = dict(max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
OFFLINE = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_completions_chat_streaming_match_offline(service, offline):
    c = client(service)
    r = c.completions.create(model="mepic", prompt="Hello there, engine", **GREEDY)
    assert r.choices[0].text == offline.generate("Hello there, engine", OFFLINE)[0].text
    assert r.usage.prompt_tokens == len("Hello there, engine")

    body = dict(GREEDY["extra_body"], chunks=DOCS[:2], prefix="Docs: ")
    r = c.completions.create(model="mepic", prompt=" Q: which?", max_tokens=6, temperature=0, extra_body=body)
    want = offline.generate(["Docs: ", Chunk(DOCS[0]), Chunk(DOCS[1]), " Q: which?"], OFFLINE)[0]
    assert r.choices[0].text == want.text

    msgs = [{"role": "user", "content": "hi # # " + DOCS[2] + " # # what?"}]
    r = c.chat.completions.create(model="mepic", messages=msgs, **GREEDY)
    assert r.choices[0].message.content == offline.chat(msgs, OFFLINE).text

    # Chunks on the chat route: each placed as "Passage: <text>\n" at the start of the
    # last user message (one byte, one token with the test tokenizer), as LLM.chat does.
    ask = [{"role": "user", "content": "what?"}]
    with_docs = c.chat.completions.create(model="mepic", messages=ask, max_tokens=6, temperature=0,
                                          extra_body=dict(GREEDY["extra_body"], chunks=DOCS[:2]))
    bare = c.chat.completions.create(model="mepic", messages=ask, **GREEDY)
    assert with_docs.choices[0].message.content == offline.chat(ask, OFFLINE, chunks=DOCS[:2]).text
    assert with_docs.usage.prompt_tokens - bare.usage.prompt_tokens == sum(len(f"Passage: {d}\n") for d in DOCS[:2])

    parts = list(c.completions.create(model="mepic", prompt="Hello there, engine", stream=True, **GREEDY))
    assert "".join(p.choices[0].text for p in parts) == offline.generate("Hello there, engine", OFFLINE)[0].text
    assert parts[-1].choices[0].finish_reason == "length"
    chat_parts = list(c.chat.completions.create(model="mepic", messages=msgs, stream=True, **GREEDY))
    assert "".join(p.choices[0].delta.content or "" for p in chat_parts) == offline.chat(msgs, OFFLINE).text
    assert [m.id for m in c.models.list().data] == ["mepic"]
    assert httpx.get(service + "/health").json() == {"status": "ok"}


def test_logprobs_through_the_openai_client(service, offline):
    c, tok = client(service), offline.engine.tokenizer
    want = offline.generate("Hello there, engine", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                                  logprobs=2))[0]
    r = c.completions.create(model="mepic", prompt="Hello there, engine", logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([chosen for chosen, _ in want.logprobs], abs=1e-4)
    assert lp.tokens == [tok.decode([t]) for t in want.token_ids]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(top) in (1, 2) and max(top.values()) == pytest.approx(chosen, abs=1e-6)   # greedy took the best

    msgs = [{"role": "user", "content": "hi # # " + DOCS[2] + " # # what?"}]
    want = offline.chat(msgs, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))
    parts = list(c.chat.completions.create(model="mepic", messages=msgs, stream=True, logprobs=True, top_logprobs=3,
                                           **GREEDY))
    content = [e for p in parts if p.choices and p.choices[0].logprobs for e in p.choices[0].logprobs.content]
    assert [e.logprob for e in content] == pytest.approx([chosen for chosen, _ in want.logprobs], abs=1e-4)
    for e, (_, top) in zip(content, want.logprobs):
        assert [t.token for t in e.top_logprobs] == [tok.decode([t]) for t, _ in top]
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)     # greedy took the best
    plain = c.completions.create(model="mepic", prompt="Hello there, engine", **GREEDY)
    assert plain.choices[0].logprobs is None


def post(base, path, body, raw=False):
    data = body if raw else json.dumps(body)
    return httpx.post(base + path, content=data, headers={"content-type": "application/json"}, timeout=60)


def test_requests_sharing_chunks_land_on_the_replica_that_holds_them(service):
    first = post(service, "/v1/completions", {"prompt": " Q0", "chunks": DOCS[:2], "max_tokens": 2})
    holder = first.headers["x-mepic-replica"]
    for i, docs in enumerate([DOCS[1::-1], DOCS[:2]] * 3):
        r = post(service, "/v1/completions", {"prompt": f" Q{i + 1}", "chunks": docs, "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-mepic-replica"] == holder
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    # Unrelated traffic spreads: each new document goes where its hash points (the same
    # replica from every ingress), so twelve of them all landing on one of two replicas
    # has odds 2^-11.
    landed = {post(service, "/v1/completions", {"prompt": " Qx", "chunks": [f"{DOCS[2]} {i}"], "max_tokens": 2})
              .headers["x-mepic-replica"] for i in range(12)}
    assert len(landed) == 2, landed


@pytest.mark.parametrize("body,status,needle", [
    ("{not json", 400, "invalid JSON"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "does not exist"),
    ({"prompt": "y" * 5000}, 400, "context"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "chunks": "not a list"}, 400, "chunks"),
    ({"prompt": "x", "chunks": ["ok", 3]}, 400, "chunks"),
    ({"prompt": "x", "chunks": [" "]}, 400, "empty"),
])
def test_bad_input_gets_4xx_and_service_keeps_serving(service, body, status, needle):
    r = post(service, "/v1/completions", body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    ok = post(service, "/v1/completions", {"prompt": "still fine", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_bad_chat_input(service):
    for body in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                 {"messages": [{"role": "user", "content": 5}]}):
        r = post(service, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"



def test_metrics_are_exported(service):
    """Replica and router metrics reach the node's Prometheus endpoint."""
    import time
    post(service, "/v1/completions", {"prompt": " metrics", "chunks": DOCS[:1], "max_tokens": 2})
    want = ["ray_mepic_prompt_tokens", "ray_mepic_ttft_seconds", "ray_mepic_kv_blocks", "ray_mepic_router_decisions",
            "ray_mepic_chunk_hits", "ray_mepic_store_events", "ray_mepic_store_bytes", "ray_mepic_engine_events",
            "ray_mepic_prefill_steps", "ray_mepic_router_decision_seconds", "ray_mepic_router_probes"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{service_metrics_port[0]}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(w in text for w in want):
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, f"not exported: {missing}"




def test_flooded_holder_sheds_load_to_the_other_replica(service):
    """Long streams for the same chunks held open: affinity keeps them on the holder
    until queues are imbalanced (abs 4, rel 1.5), then the router sends new ones away."""
    docs = [DOCS[2], DOCS[0]]
    holder = post(service, "/v1/completions", {"prompt": " warm", "chunks": docs, "max_tokens": 2}).headers["x-mepic-replica"]
    replicas = []
    with httpx.Client(timeout=60) as http:
        streams = []
        try:
            for i in range(8):
                body = {"prompt": f" flood {i}", "chunks": docs, "max_tokens": 1500, "ignore_eos": True, "stream": True}
                cm = http.stream("POST", service + "/v1/completions", json=body)
                streams.append(cm)
                replicas.append(cm.__enter__().headers["x-mepic-replica"])
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)
    assert replicas[:5] == [holder] * 5          # affinity while load is balanced enough
    assert any(r != holder for r in replicas)    # then load fallback
    assert replicas.count(holder) > len(replicas) // 2


def test_prompt_prefix_is_a_second_routing_signal(service):
    """A prompt without chunks goes where its leading text blocks went before, even
    when spreading unrelated traffic would pick the other replica."""
    system = "You are the assistant of the prefix routing test; answer in one word. " * 2
    holder = post(service, "/v1/completions", {"prompt": system + "Q1", "max_tokens": 2}).headers["x-mepic-replica"]
    for _ in range(20):   # unrelated requests until spreading chooses the other replica (it counts sends)
        probe = post(service, "/v1/completions", {"prompt": "z", "max_tokens": 1}).headers["x-mepic-replica"]
        if probe != holder:
            break
    assert probe != holder
    for q in ("Q2", "Q3"):
        r = post(service, "/v1/completions", {"prompt": system + q, "max_tokens": 2})
        assert r.headers["x-mepic-replica"] == holder
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


def test_chunks_outlive_their_replica_through_the_store(service, offline):
    """Kill the replica that compiled two chunks: whichever replica serves them next
    (the survivor, or the replacement warmed from the store) does not compile them."""
    import time
    docs = ["delta document about oceans, tides and the deep blue water",
            "epsilon document about forests, moss and tall old trees"]
    body = {"prompt": " Q: which?", "chunks": docs, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    first = post(service, "/v1/completions", body)
    assert first.json()["usage"]["mepic"]["compiled_tokens"] > 0
    holder = first.headers["x-mepic-replica"]
    time.sleep(1.0)   # write-through demotion is asynchronous
    ray.kill(ray.get_actor(f"SERVE_REPLICA::mepic#EngineServer#{holder}", namespace="serve"), no_restart=True)
    body["chunks"] = docs[::-1]
    deadline = time.time() + 60
    while True:     # a request routed to the dying replica gets a 503; clients retry those
        r = post(service, "/v1/completions", body)
        if r.status_code != 503 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert r.headers["x-mepic-replica"] != holder
    assert r.json()["usage"]["mepic"]["compiled_tokens"] == 0
    want = offline.generate([Chunk(docs[1]), Chunk(docs[0]), " Q: which?"],
                            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert r.json()["choices"][0]["text"] == want.text


def test_stream_usage_chunk(service, offline):
    """stream_options.include_usage: a last chunk with no choices carries the usage."""
    c = client(service)
    parts = list(c.completions.create(model="mepic", prompt=" usage?", stream=True,
                                      stream_options={"include_usage": True},
                                      **{**GREEDY, "extra_body": {**GREEDY["extra_body"], "chunks": DOCS[:1]}}))
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == 6
    want = offline.generate([Chunk(DOCS[0]), " usage?"], OFFLINE)[0]
    assert parts[-1].usage.prompt_tokens == want.stats.prompt_tokens
    assert "".join(p.choices[0].text for p in parts[:-1]) == want.text
