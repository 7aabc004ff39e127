"""The object-store tier on a real local Ray: chunk KV moves between engines
unchanged, eviction demotes once, a later request loads instead of compiling, the byte
budget holds, and a new engine warms from the store (what goes wrong:
``test_chunk_store_faults.py``).

Outputs are compared with an engine that compiles the chunks itself (same
logits, exactly: loaded pages must be the canonical pages), and page counts
with a brute-force count from token counts."""
import asyncio
import itertools
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

ray = pytest.importorskip("ray")

from mepic_ray import LLM  # noqa: E402
from mepic_ray.tier.chunk_store import ChunkDirectory  # noqa: E402
from store_helpers import (BS, DOCS, GREEDY, first_logits, local_ray, mepic_shared_tokens,  # noqa: E402,F401
                           prompt, store_cfg, store_of, store_stats)


def test_chunk_compiled_on_one_engine_is_loaded_by_another(tiny_model_dir):
    cfg = store_cfg()
    a = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    p = prompt(DOCS[1], DOCS[3])
    out_a, _ = first_logits(a, p)
    assert out_a.stats.compiled_tokens > 0 and out_a.stats.loaded_tokens == 0
    a.engine.tier.client.flush()

    b = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    other_order = ["Other system. ", p[2], p[1], " Q?"]      # same chunks, other positions
    out_b, logits_b = first_logits(b, other_order)
    out_c, logits_c = first_logits(LLM(tiny_model_dir, num_blocks=256, block_size=BS), other_order)
    assert out_b.stats.compiled_tokens == 0
    assert out_b.stats.chunks_store == 2 and out_b.stats.chunks_miss == 0
    assert out_b.stats.loaded_tokens == sum(mepic_shared_tokens(b, d) for d in (DOCS[1], DOCS[3]))
    assert out_b.stats.recomputed_tokens == out_c.stats.recomputed_tokens     # only first blocks, as with its own chunks
    assert torch.equal(logits_b, logits_c)
    assert out_b.token_ids == out_c.token_ids
    # A wrote each chunk once; B, having loaded them, never demotes them again.
    b.reset_cache()
    b.generate(prompt(*DOCS[4:6]), GREEDY)
    b.engine.tier.client.flush()
    s = store_stats(cfg)
    assert s["puts"] == 4 and s["duplicates"] == 0


def test_eviction_demotes_and_a_later_request_loads_back(tiny_model_dir):
    cfg = store_cfg(write_through=False)
    llm = LLM(tiny_model_dir, num_blocks=40, block_size=BS, store=cfg)
    first = prompt(DOCS[5], DOCS[4])
    out1, _ = first_logits(llm, first)
    assert store_stats(cfg)["num_chunks"] == 0          # nothing published before eviction
    for d in itertools.islice(itertools.cycle(DOCS[:4]), 6):   # push the first chunks out of the pool
        llm.generate(prompt(d, DOCS[(DOCS.index(d) + 1) % 4]), GREEDY)
    llm.engine.tier.client.flush()
    assert llm.engine.tier.client.counts["demotions"] >= 2
    assert not {c.chunk_hash for c in llm.engine.make_request(first).layout.chunks} & set(llm.engine.kv.chunks.entries)
    again, logits = first_logits(llm, first)
    fresh, logits_fresh = first_logits(LLM(tiny_model_dir, num_blocks=256, block_size=BS), first)
    assert again.stats.compiled_tokens == 0 and again.stats.chunks_store == 2
    # Not bitwise: the reloading request also hits its cached prompt prefix, so it computes
    # fewer rows, and attention picks its kernel by shape (rounding differs, ~1e-7).
    torch.testing.assert_close(logits, logits_fresh, atol=1e-5, rtol=1e-5)
    assert llm.stats()["used_blocks"] == 0


def test_measured_costs_decide_between_load_and_compile(tiny_model_dir):
    cfg = store_cfg()
    a = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    a.generate(prompt(DOCS[0]), GREEDY)
    a.engine.tier.client.flush()
    b = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    costs = b.engine.tier.client.costs
    costs.observe_compile(1e-6, 1000)           # compiling measured nearly free ...
    costs.observe_load(10.0, 1000)              # ... and loading slow: recompute wins
    out, logits = first_logits(b, prompt(DOCS[0]))
    assert out.stats.loaded_tokens == 0 and out.stats.compiled_tokens > 0
    assert b.engine.tier.client.counts["load_skipped_cost"] == 1
    b.reset_cache()
    costs.compile_s_per_token, costs.load_s_per_byte = 1.0, 1e-12
    out2, logits2 = first_logits(b, prompt(DOCS[0]))
    assert out2.stats.compiled_tokens == 0 and out2.stats.loaded_tokens > 0
    assert torch.equal(logits, logits2)


def test_mismatched_entry_is_recomputed_not_used(tiny_model_dir):
    """Another model's object, another chunk's, and one of the first KV format (NoPE
    keys, whose layout names no format) under the right hash: none is loaded."""
    kv = torch.full((2, 2, 8, 2, 16), 3.0)      # garbage of the right shape, under the right hash
    _, ref = first_logits(LLM(tiny_model_dir, num_blocks=256, block_size=BS), prompt(DOCS[2]))
    first_format = lambda layout: {"layout": {k: v for k, v in layout.items() if k != "kv_format"}}
    for bad in (lambda _: {"fingerprint": "other-model"}, lambda _: {"token_ids": (1, 2, 3)}, first_format):
        cfg = store_cfg()
        llm = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
        c = llm.engine.make_request(prompt(DOCS[2])).layout.chunks[0]
        layout = llm.engine.tier.client.layout
        assert layout["kv_format"] == 2
        meta = {"hash": c.chunk_hash, "token_ids": c.padded_ids, "num_tokens": 8, "fingerprint": llm.engine.fingerprint,
                "layout": layout, "shape": tuple(kv.shape), "nbytes": kv.numel() * 4, **bad(layout)}
        store = store_of(cfg)
        ray.get(store.put.remote(meta, kv.view(torch.uint8).reshape(-1).numpy()))
        out, logits = first_logits(llm, prompt(DOCS[2]))
        assert out.stats.loaded_tokens == 0 and out.stats.chunks_miss == 1
        assert torch.equal(logits, ref)
        assert llm.engine.tier.client.counts["store_mismatch"] == 1


def test_a_load_that_fails_halfway_compiles_the_rest(tiny_model_dir):
    """Two chunks in the store, one of them truncated: the good one is loaded, the
    broken one compiled, the answer is the self-compiled one and no page leaks."""
    cfg = store_cfg()
    a = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    p = prompt(DOCS[1], DOCS[2])
    a.generate(prompt(DOCS[1]), GREEDY)
    a.engine.tier.client.flush()
    broken = a.engine.make_request(prompt(DOCS[2])).layout.chunks[0]
    want = a.engine.tier.wants(a.engine.make_request(prompt(DOCS[2])))[0]
    meta = {"hash": broken.chunk_hash, "token_ids": broken.padded_ids, "num_tokens": want.shared_tokens,
            "fingerprint": a.engine.fingerprint, "layout": a.engine.tier.client.layout, "shape": want.shape,
            "nbytes": 64}
    store = store_of(cfg)
    ray.get(store.put.remote(meta, torch.zeros(64, dtype=torch.uint8).numpy()))   # right meta, bytes cut short
    b = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    out, logits = first_logits(b, p)
    _, ref = first_logits(LLM(tiny_model_dir, num_blocks=256, block_size=BS), p)
    assert out.stats.chunks_store == 1 and out.stats.chunks_miss == 1
    assert out.stats.loaded_tokens == mepic_shared_tokens(b, DOCS[1])
    assert b.engine.tier.client.counts["error_load"] == 1
    assert torch.equal(logits, ref)
    assert b.stats()["used_blocks"] == 0


def test_byte_budget_holds_with_lru_eviction(tiny_model_dir):
    probe = LLM(tiny_model_dir, num_blocks=256, block_size=BS)
    per_page = 2 * 2 * BS * 2 * 16 * 4          # K and V, 2 layers, 2 kv heads, head_dim 16, fp32
    budget = 24 * per_page         # room for two or three of the chunks, not all
    cfg = store_cfg(budget_bytes=budget)
    llm = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    for d in DOCS:
        llm.generate(prompt(d), GREEDY)
        llm.engine.tier.client.flush()
        assert store_stats(cfg)["bytes_used"] <= budget
    s = store_stats(cfg)
    pages = [-(-mepic_shared_tokens(probe, d) // BS) for d in DOCS]
    # Brute-force LRU over page counts (puts only, in order).
    held: list[int] = []
    for n in pages:
        if n * per_page > budget:
            continue
        held.append(n)
        while sum(held) * per_page > budget:
            held.pop(0)
    assert s["bytes_used"] == sum(held) * per_page
    assert s["evictions"] > 0


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("pld"), st.integers(0, 7), st.integers(1, 40)), max_size=40),
       budget=st.integers(1, 100))
def test_directory_matches_brute_force_lru(ops, budget):
    d = ChunkDirectory(budget)
    oracle: list[tuple[str, int]] = []           # least recently used first
    for op, key, size in ops:
        h = f"h{key}"
        have = [k for k, _ in oracle]
        if op == "p":
            ok = d.put({"hash": h, "nbytes": size}, lambda: object())
            if h in have:
                oracle.append(oracle.pop(have.index(h)))
                assert ok
            elif size > budget:
                assert not ok
            else:
                oracle.append((h, size))
                while sum(s for _, s in oracle) > budget:
                    oracle.pop(0)
        elif op == "l":
            found = d.lookup([h])
            assert (h in found) == (h in have)
            if h in have:
                oracle.append(oracle.pop(have.index(h)))
        else:      # drop: only with the object the entry holds; a stale one (size odd) changes nothing
            ref = d.entries[h].ref if h in have and size % 2 == 0 else object()
            assert d.drop(h, ref) == (h in have and size % 2 == 0)
            if h in have and size % 2 == 0:
                oracle.pop(have.index(h))
        assert list(d.entries) == [k for k, _ in oracle]
        assert d.bytes_used == sum(s for _, s in oracle) <= budget


def test_new_engine_warms_from_the_store(tiny_model_dir):
    from mepic_ray.async_engine import AsyncLLMEngine
    from mepic_ray.config import EngineConfig
    cfg = store_cfg()
    a = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    a.generate(prompt(DOCS[0], DOCS[2]), GREEDY)
    a.engine.tier.client.flush()
    b = AsyncLLMEngine(EngineConfig(model=tiny_model_dir, num_blocks=256, block_size=BS), store=cfg)
    assert b.warm_from_store() == 2
    assert len(b.resident_chunks()) == 2

    async def go():
        return [o async for o in b.generate(prompt(DOCS[2], DOCS[0]), GREEDY, "w")][-1]
    out = asyncio.run(go())
    assert out.stats.chunks_pool == 2 and out.stats.compiled_tokens == 0 and out.stats.loaded_tokens == 0
    assert out.token_ids == LLM(tiny_model_dir, num_blocks=256, block_size=BS).generate(
        prompt(DOCS[2], DOCS[0]), GREEDY)[0].token_ids


def test_chunks_the_store_evicted_are_demoted_again(tiny_model_dir):
    """The replica's "already published" set learns of the store's own LRU evictions,
    so a chunk the store dropped is demoted again instead of being lost to both tiers."""
    from mepic_ray.tier.store_client import StoreClient
    kv = {h: torch.randn(2, 2, BS, 2, 16) for h in "ab"}
    nbytes = kv["a"].numel() * kv["a"].element_size()
    cfg = store_cfg(budget_bytes=nbytes * 3 // 2, resync_s=0.2)      # room for one chunk
    client = StoreClient(cfg, "fp", {"block_size": BS, "dtype": "float32"})
    store = store_of(cfg)
    for h in "ab":
        assert client.demote(h, tuple(range(BS)), BS, kv[h])
        client.flush()
    assert ray.get(store.present.remote(["a", "b"])) == ["b"]         # the store evicted a
    deadline = time.time() + 30
    while "a" in client.published and time.time() < deadline:
        time.sleep(0.05)
    assert client.published == {"b"} and client.counts["store_evicted"] == 1
    assert not client.demote("b", tuple(range(BS)), BS, kv["b"])     # still held: not sent twice
    assert client.demote("a", tuple(range(BS)), BS, kv["a"])
    client.flush()
    assert ray.get(store.present.remote(["a", "b"])) == ["a"]
    assert store_stats(cfg)["duplicates"] == 0
