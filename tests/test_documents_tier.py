"""Registered documents at the engine level, on a real local Ray: a document compiled
ahead of traffic has the hash the ingress computes and the bytes an ordinary
request's compile leaves in the pool, and a new engine warmed with it answers as an
engine that compiles the document itself, without compiling anything."""
import asyncio
import uuid

import pytest
import torch

ray = pytest.importorskip("ray")

from mepic_ray import LLM, Chunk, SamplingParams, StoreConfig  # noqa: E402
from mepic_ray.async_engine import AsyncLLMEngine  # noqa: E402
from mepic_ray.config import EngineConfig  # noqa: E402
from mepic_ray.routing import PublicChunk, build_routing  # noqa: E402
from mepic_ray.tier.kv_codec import encode_kv  # noqa: E402

BS = 8
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
DOCS = ["the harbour cranes lift containers onto the ships at dawn, " * 3,
        "a public handbook page: cranes are inspected every spring. " * 2]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_offline(model_dir: str, p, namespace: str):
    """An engine without a store that serves ``p`` in ``namespace``: it and the answer's tokens."""
    eng = LLM(model_dir, num_blocks=256, block_size=BS).engine
    req = eng.make_request(p, GREEDY, "ref", (), namespace)
    eng.enqueue(req)
    while eng.has_unfinished():
        eng.step()
    return eng, list(req.output_ids)


def prompt(*chunks):
    return ["System: answer briefly. ", *chunks, " Question: what is lifted?"]


def test_compiled_documents_match_request_compiles_and_warm_a_new_engine(tiny_model_dir):
    cfg = StoreConfig(name=f"store-{uuid.uuid4().hex[:8]}", load_policy="always")
    engine_cfg = EngineConfig(model=tiny_model_dir, num_blocks=256, block_size=BS)
    a = AsyncLLMEngine(engine_cfg, store=cfg)
    chunks = [Chunk(DOCS[0]), PublicChunk(DOCS[1])]
    compiled = asyncio.run(a.compile_chunks(chunks, "team-a"))

    # The hashes the ingress routes by, computed its own way (torch-free, from the text).
    eng = a.engine
    info = build_routing([{"chunk": DOCS[0]}, {"chunk": DOCS[1], "public": True}, {"text": "?"}], eng.encode,
                         eng.fingerprint, BS, eng.encode_text, "team-a")
    assert [c["hash"] for c in compiled] == [h for h, _ in info.chunks]
    assert [c["tokens"] for c in compiled] == [n for _, n in info.chunks]

    # The bytes an ordinary request's compile leaves in another engine's pool.
    ref_engine, _ = run_offline(tiny_model_dir, prompt(*chunks), "team-a")
    for c in compiled:
        entry = ref_engine.kv.chunks.entries[c["hash"]]
        assert torch.equal(c["kv"], ref_engine.runner.export_blocks(entry.blocks))
        assert c["meta"]["nbytes"] == c["kv"].numel() * c["kv"].element_size()

    # Registered with warm: a new engine picks them up and compiles nothing.
    store = a.tier.client.store()
    new = [{"id": f"d{i}", "public": i == 1, "text": DOCS[i], "tokens": c["tokens"],
            "forms": {"completions": c["hash"]},
            "nbytes": {c["hash"]: c["meta"]["nbytes"]}, "metadata": {}, "pin": True, "ttl_s": None}
           for i, c in enumerate(compiled)]
    answer = ray.get(store.documents_register.remote("team-a", new, {c["hash"]: (c["meta"], encode_kv(c["kv"]))
                                                                      for c in compiled}, True))
    assert [d["status"] for d in answer["ok"]] == ["registered", "registered"], answer
    b = AsyncLLMEngine(engine_cfg, store=cfg)
    items, cursor = b.tier.client.warm_updates(0)
    assert sorted(b.adopt(items)) == sorted(c["hash"] for c in compiled) and cursor == 2

    async def go():
        return [o async for o in b.generate(prompt(*chunks), GREEDY, "w", (), "team-a")][-1]
    out = asyncio.run(go())
    assert out.stats.compiled_tokens == 0 and out.stats.chunks_pool == 2
    _, expected = run_offline(tiny_model_dir, prompt(*chunks), "team-a")     # compiles them itself
    assert out.token_ids == expected
    ray.kill(store)
