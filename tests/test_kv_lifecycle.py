"""Bugs a review found in how KV outlives a request: host copies of the private-copy
baselines (bounded, cleared by reset), warming that must not evict cached prefixes,
and stats read from another thread while the engine thread changes the pool."""
import asyncio
import sys
import threading

import pytest
import torch

from mepic_ray import Chunk, LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
BS = 8


def doc(i: int) -> str:
    return f"document number {i} talks about topic {i} at some length. " * 2


@pytest.mark.parametrize("mode", ["epic", "cacheblend"])
def test_reset_cache_drops_host_copies(tiny_model_dir, mode):
    llm = LLM(tiny_model_dir, mode=mode, num_blocks=256, block_size=BS)
    p = ["S: ", Chunk(doc(0)), " Q?"]
    first = llm.generate(p, GREEDY)[0]
    again = llm.generate(p, GREEDY)[0]
    assert first.stats.compiled_tokens > 0 and again.stats.compiled_tokens == 0   # copied from the host copy
    llm.reset_cache()
    after = llm.generate(p, GREEDY)[0]
    assert after.stats.compiled_tokens == first.stats.compiled_tokens             # nothing left to copy
    assert after.token_ids == first.token_ids


def test_host_copies_stay_under_their_budget(tiny_model_dir):
    """An LRU oracle over the order chunks are used decides which must be compiled again."""
    probe = LLM(tiny_model_dir, mode="epic", num_blocks=256, block_size=BS)
    per_block = probe.engine.bytes_per_block
    sizes = {i: -(-len(probe.engine.encode(doc(i))) // BS) * per_block for i in range(4)}
    budget = sizes[0] + sizes[1] + sizes[2] // 2     # two documents fit, never three
    llm = LLM(tiny_model_dir, mode="epic", num_blocks=256, block_size=BS,
              mode_options={"host_copy_bytes": budget})
    held: list[int] = []                             # the oracle: most recently used last
    for i in [0, 1, 0, 2, 1, 3, 0, 2, 2]:
        out = llm.generate(["S: ", Chunk(doc(i)), " Q?"], GREEDY)[0]
        assert (out.stats.compiled_tokens == 0) == (i in held), (i, held)
        held = [j for j in held if j != i] + [i]
        while sum(sizes[j] for j in held) > budget:
            held.pop(0)
        copies = llm.engine.runner.host_copies
        assert sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in copies.values()) <= budget
        assert len(copies) == len(held)


def test_warming_keeps_cached_prefixes(tiny_model_dir):
    """Adopting a stored chunk takes only free blocks that hold no cached prefix: the
    next request hits the same prefix as it does on an engine that warmed nothing."""
    num_blocks = 24
    prompt = "a system prompt filling several blocks " * 2 + "and a question?"

    def run(adopt: bool):
        llm = LLM(tiny_model_dir, mode="mepic", num_blocks=num_blocks, block_size=BS)
        first = llm.generate(prompt, GREEDY)[0]
        eng = llm.engine
        if adopt:   # more blocks than the pool has never used: only cached ones would do
            n_blocks = num_blocks - (-(-first.stats.prompt_tokens // BS) + 1) + 3
            eng.adopt_chunk({"hash": "warm-chunk", "token_ids": [7] * (n_blocks + 1) * BS},
                            torch.zeros(eng.chunk_kv_shape(n_blocks)))
        return llm.generate(prompt, GREEDY)[0]

    plain, warmed = run(False), run(True)
    assert plain.stats.cached_tokens > 0
    assert warmed.stats.cached_tokens == plain.stats.cached_tokens
    assert warmed.token_ids == plain.token_ids


def test_stats_from_another_thread_while_chunks_churn(tiny_model_dir):
    """The Serve replica calls stats() and resident_chunks() on its own threads while the
    engine thread creates and evicts chunks."""
    from mepic_ray.async_engine import AsyncLLMEngine
    from mepic_ray.config import EngineConfig
    eng = AsyncLLMEngine(EngineConfig(model=tiny_model_dir, num_blocks=160, block_size=4))
    errors, done = [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                eng.stats()
                eng.resident_chunks()
            except Exception as e:   # "dictionary changed size during iteration"
                errors.append(e)
                return

    async def drive():
        prompts = [["S", *(Chunk(f"c{i}-{j} " * 2) for j in range(24)), "?"] for i in range(40)]
        for i, p in enumerate(prompts):
            async for _ in eng.generate(p, SamplingParams(max_tokens=1, temperature=0), f"r{i}"):
                pass

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)     # switch threads often, so an unsafe walk meets a change
    readers = [threading.Thread(target=reader) for _ in range(2)]
    try:
        for t in readers:
            t.start()
        asyncio.run(drive())
    finally:
        done.set()
        for t in readers:
            t.join(10)
        sys.setswitchinterval(old)
    assert not errors, errors
    assert eng.stats()["num_chunks"] > 0
