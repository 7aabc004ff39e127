"""The object-store tier when things go wrong, on a real local Ray: an object lost with
its owner, the store killed mid-run, a store that hangs, and Ray shut down under the
store client's threads. No request is lost and outputs equal an engine that compiles
every chunk itself."""
import asyncio
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from mepic_ray import LLM  # noqa: E402
from store_helpers import (BS, DOCS, GREEDY, first_logits, local_ray, mepic_shared_tokens,  # noqa: E402,F401
                           prompt, store_cfg, store_of, store_stats)


@ray.remote(num_cpus=0)
class ShortLivedOwner:
    def hold(self, buf):
        return [ray.put(buf)]


def test_a_lost_object_is_recomputed_and_replaced_in_the_store(tiny_model_dir):
    """The store still lists a chunk whose object died with its owner: the request
    compiles the chunk (logits equal a store-less engine's), the dead entry is dropped,
    and the chunk's next demotion puts a readable copy that a third engine loads."""
    cfg = store_cfg(load_policy="always")
    p = prompt(DOCS[3], DOCS[1])
    a = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    a.generate(p, GREEDY)
    a.engine.tier.client.flush()
    store = store_of(cfg)
    lost_hash = a.engine.make_request(p).layout.chunks[0].chunk_hash
    buf = ray.get(ray.get(store.lookup.remote([lost_hash]))[lost_hash]["ref"][0])
    owner = ShortLivedOwner.remote()
    doomed = ray.get(owner.hold.remote(buf))

    def rehome(actor, h, ref):
        actor.dir.entries[h].ref = ref[0]
    ray.get(store.__ray_call__.remote(rehome, lost_hash, doomed))
    ray.kill(owner)                    # the directory now points at an object nobody owns
    deadline = time.monotonic() + 60   # the raylet frees a dead owner's objects a little later
    while time.monotonic() < deadline:
        try:
            ray.get(doomed[0], timeout=5)
            time.sleep(0.2)
        except ray.exceptions.ObjectLostError:
            break
    else:
        pytest.fail("the object outlived its owner")

    b = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    out, logits = first_logits(b, p)
    _, ref = first_logits(LLM(tiny_model_dir, num_blocks=256, block_size=BS), p)
    assert out.stats.chunks_store == 1 and out.stats.chunks_miss == 1       # the other chunk still loads
    assert out.stats.loaded_tokens == mepic_shared_tokens(b, DOCS[1])
    assert torch.equal(logits, ref)
    assert b.engine.tier.client.counts["error_load"] == 1 and b.engine.tier.client.counts["store_dropped"] == 1
    b.engine.tier.client.flush()
    deadline = time.monotonic() + 30
    while store_stats(cfg)["puts"] < 3 and time.monotonic() < deadline:   # a's two, b's replacement
        time.sleep(0.05)
    s = store_stats(cfg)
    assert s["dropped"] == 1 and s["puts"] == 3 and s["num_chunks"] == 2
    c = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    out_c, logits_c = first_logits(c, p)
    assert out_c.stats.chunks_store == 2 and out_c.stats.compiled_tokens == 0
    assert torch.equal(logits_c, ref)


def test_killing_the_store_mid_run_loses_no_request(tiny_model_dir):
    from mepic_ray.async_engine import AsyncLLMEngine
    from mepic_ray.config import EngineConfig
    cfg = store_cfg(retry_after_s=0.2, load_policy="always")   # measured costs are not under test here
    eng = AsyncLLMEngine(EngineConfig(model=tiny_model_dir, num_blocks=64, block_size=BS), store=cfg)
    reference = LLM(tiny_model_dir, num_blocks=512, block_size=BS)
    prompts = [prompt(DOCS[i % 6], DOCS[(i * 5 + 1) % 6]) for i in range(24)]

    async def one(i, delay=0.0):
        await asyncio.sleep(delay)
        last = None
        async for out in eng.generate(prompts[i], GREEDY, f"r{i}"):
            last = out
        return last

    async def run():
        # Whatever the timing, the tier is in use before the kill: request 0's chunks are
        # published and dropped from the pool, so request 0 loads them when it comes again.
        await one(0)
        eng.tier.client.flush()
        eng.engine.reset_cache()
        # Staggered arrivals; the store dies while earlier requests are still running.
        tasks = [asyncio.create_task(one(i, 0.1 * i)) for i in range(len(prompts))]
        await asyncio.wait(tasks[:8])
        ray.kill(store_of(cfg))
        return await asyncio.gather(*tasks)
    outs = asyncio.run(asyncio.wait_for(run(), 300))
    assert all(o.finished and o.error is None for o in outs)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference.generate(prompts, GREEDY)]
    assert eng.tier.client.counts["loads"] >= 1              # the tier was in use before the kill
    assert eng.tier.client.counts["error_lookup"] + eng.tier.client.counts["error_demote"] >= 1
    # Once the back-off has passed, a fresh store is created on the next use and the tier works again.
    eng.engine.reset_cache()
    eng.tier.client.flush()
    while not eng.tier.client.breaker.allow():
        time.sleep(0.05)
    again = asyncio.run(asyncio.wait_for(one(0), 60))
    eng.tier.client.flush()
    assert again.token_ids == outs[0].token_ids
    assert store_stats(cfg)["num_chunks"] >= 1


@ray.remote(max_concurrency=8)
class HungStore:
    """Answers nothing in time, as a store actor stuck on a busy node would."""

    def __init__(self):
        self.lookups = 0

    def lookup(self, hashes):
        self.lookups += 1
        time.sleep(60)

    def calls(self):
        return self.lookups


def test_a_hung_store_is_skipped_until_its_backoff_passes(tiny_model_dir):
    cfg = store_cfg(timeout_s=0.5, retry_after_s=1.0, write_through=False)
    hung = HungStore.options(name=cfg.name, namespace=cfg.namespace).remote()
    assert ray.get(hung.calls.remote(), timeout=60) == 0    # started: its start-up is not the hang under test
    reference = LLM(tiny_model_dir, num_blocks=256, block_size=BS)
    llm = LLM(tiny_model_dir, num_blocks=256, block_size=BS, store=cfg)
    client = llm.engine.tier.client
    try:
        prompts = [prompt(DOCS[0], DOCS[1]), prompt(DOCS[2]), prompt(DOCS[3], DOCS[4])]
        outs = [llm.generate(p, GREEDY)[0] for p in prompts[:2]]
        # The first miss waited out one timeout; the second skipped the store at once.
        assert ray.get(hung.calls.remote()) == 1
        assert client.counts["error_lookup"] == 1 and client.counts["store_skipped"] >= 1
        while not client.breaker.allow():
            time.sleep(0.05)
        outs.append(llm.generate(prompts[2], GREEDY)[0])     # the backoff passed: probed again
        assert ray.get(hung.calls.remote()) == 2
        assert client.breaker.backoff_s == 2.0                 # and, failing again, it doubled
        assert [o.token_ids for o in outs] == [o.token_ids for o in reference.generate(prompts, GREEDY)]
        assert all(o.stats.compiled_tokens > 0 and o.stats.loaded_tokens == 0 for o in outs)
    finally:
        ray.kill(hung)


def test_background_threads_never_restart_ray_after_shutdown(tiny_model_dir):
    """A replica's store thread keeps running after ray.shutdown() (tests, drivers that
    reconnect); a remote call from it would quietly start a fresh local Ray instance."""
    from mepic_ray.tier.store_client import StoreClient
    client = StoreClient(store_cfg(resync_s=0.05), "fp", {"block_size": BS, "dtype": "float32"})
    client.published.add("some-chunk")      # something to resync
    ray.shutdown()
    try:
        deadline = time.time() + 3          # dozens of resync periods
        while time.time() < deadline and not ray.is_initialized():
            time.sleep(0.05)
        assert not ray.is_initialized()
    finally:
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)   # for the module's teardown
