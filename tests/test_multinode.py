"""The shipped YAML on a real multi-node Ray cluster on one machine (head, two worker
nodes and a spare, each its own raylet and object store; ``serve run``; the tiny
model): a chunk compiled on one node is loaded on another, killing a worker's raylet
mid-stream loses no accepted request, the router stops sending to the dead node, the
replacement warms from the store, and the store's own loss costs compiles, never
requests (``bench/multinode.py`` holds the steps; this file checks them).

Reference: every answer against one offline engine's greedy answer to the same prompt."""
import time
import uuid

import pytest

ray = pytest.importorskip("ray")

from bench.multinode import MultiNodeApp, node_loss  # noqa: E402
from mepic_ray import LLM, Chunk, SamplingParams, StoreConfig  # noqa: E402

DOCS = ["omicron document about lighthouses, lenses and the keepers of the coast " * 2,
        "pi document about glaciers, moraines and the slow ice of the valleys " * 2]
QUESTIONS = [f"\nQ{i}: what guides the ships?\nA:" for i in range(6)]
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    a = MultiNodeApp(tmp_path_factory.mktemp("multinode"), tiny_model_dir, f"mn_{uuid.uuid4().hex[:8]}",
                     quality_gate=False, load_policy="always")
    try:
        a.wait_ready()
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    """One engine, as the YAML configures each replica's (block size 16)."""
    return LLM(tiny_model_dir, mode="mepic", block_size=16, num_blocks=512)


def want(offline, question: str) -> str:
    return offline.generate([*map(Chunk, DOCS), question],
                            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0].text


def test_a_node_loss_loses_no_request_and_the_chunks_cross_nodes(app, offline):
    before = app.replicas()
    workers = {n.node_id for n in app.workers}
    assert len(before) == 2 and set(before.values()) == workers      # one replica on each worker node
    # The ingress, which holds the streams, beside the proxy on the head (the shipped YAML).
    assert set(app.replicas("OpenAIIngress").values()) == {app.cluster.head_node.node_id}
    res = node_loss(app, DOCS, QUESTIONS, MAX_TOKENS)
    assert res["first"]["usage"]["mepic"]["compiled_tokens"] > 0
    # Every stream accepted before the kill finished, whole and exact, on the other node.
    for q, s in zip(QUESTIONS, res["streams"]):
        assert s is not None and s["status"] == 200 and not s["errors"], s
        assert s["text"] == want(offline, q)
    assert any(s["usage"]["mepic"]["resumed_tokens"] > 0 for s in res["streams"])   # some were cut by the kill
    # Afterwards nothing goes to the dead replica; the chunks come from the store (on the
    # head), loaded across nodes into the survivor's pool, never compiled again.
    assert res["holder"] not in res["survivors"]
    for q, r in zip(QUESTIONS, res["after"]):
        assert r["choices"][0]["text"] == want(offline, q)
        assert r["usage"]["mepic"]["compiled_tokens"] == 0 and r["usage"]["mepic"]["chunks_miss"] == 0
    assert not res["survivors_unseen"], res["survivors_unseen"]       # their stats must have come
    assert not res["survivors_unseen"], res["survivors_unseen"]       # their stats must have come
    counts = res["loader_store_counts"]      # read for a request, or warmed ahead of one
    assert counts["loads"] + counts["warm_loads"] >= 1, counts
    assert counts["load_bytes"] + counts["warm_bytes"] > 0 and counts["load_us"] + counts["warm_us"] > 0, counts
    # The replacement replica runs on the surviving worker and warmed from the store.
    assert len(res["replacement"]) == 1 and res["replacement_node"] in workers - {res["dead_node"]}
    assert res["replacement_stats"] is not None and res["replacement_stats"]["idle_chunk_blocks"] > 0
    for r in res["after"]:     # what it served was in its pool without a load or a compile there
        if r["replica"] in res["replacement"]:
            assert r["usage"]["mepic"]["chunks_pool"] == len(DOCS) and r["usage"]["mepic"]["chunks_store"] == 0
    assert res["store_after"]["num_chunks"] >= 2          # the store on the head kept everything


def test_losing_the_stores_node_costs_compiles_not_requests(app, tiny_model_dir, offline):
    """A store placed on the spare worker dies with that node's raylet: requests go on
    (compiling), and once the back-off has passed a new store takes the chunks again."""
    from mepic_ray.tier.chunk_store import ChunkStore
    cfg = StoreConfig(name=f"spare_{uuid.uuid4().hex[:8]}", placement="local", retry_after_s=0.2,
                      load_policy="always")
    store = ChunkStore.options(name=cfg.name, namespace=cfg.namespace, lifetime="detached",
                               resources={"spare": 1}).remote(cfg.budget_bytes)
    assert ray.get(store.ping.remote(), timeout=60)
    llm = LLM(tiny_model_dir, mode="mepic", block_size=16, num_blocks=512, store=cfg)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    prompt = [*map(Chunk, DOCS), QUESTIONS[0]]
    assert llm.generate(prompt, params)[0].text == want(offline, QUESTIONS[0])
    llm.engine.tier.client.flush()
    assert ray.get(store.stats.remote(), timeout=30)["num_chunks"] == 2
    app.kill_raylet(app.spare)
    llm.engine.reset_cache()
    out = llm.generate(prompt, params)[0]                 # the store is gone: compiled again, same answer
    assert out.error is None and out.text == want(offline, QUESTIONS[0]) and out.stats.compiled_tokens > 0
    client = llm.engine.tier.client
    client.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:                     # a new store on a living node, filled again
        llm.engine.reset_cache()
        out = llm.generate(prompt, params)[0]
        client.flush()
        try:
            if ray.get(ray.get_actor(cfg.name, namespace=cfg.namespace).stats.remote(), timeout=10)["num_chunks"]:
                break
        except Exception:
            pass
        time.sleep(0.5)
    assert out.text == want(offline, QUESTIONS[0])
    assert sum(v for k, v in client.counts.items() if k.startswith("error_")) >= 1
    assert ray.get(ray.get_actor(cfg.name, namespace=cfg.namespace).stats.remote(), timeout=10)["num_chunks"] >= 2
