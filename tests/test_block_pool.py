"""Block pool and chunk coordinator against a brute-force LRU model."""
import subprocess
import sys

from hypothesis import given, settings, strategies as st

from mepic_ray.core.block_pool import BlockPool
from mepic_ray.core.chunk_coordinator import ChunkCoordinator


def test_idle_chunks_evicted_least_recently_used_first():
    pool = BlockPool(12, enable_caching=True)
    coord = ChunkCoordinator(pool)
    entries = {name: coord.create(name, (i,), 3) for i, name in enumerate("abc")}
    for e in entries.values():
        e.ready = True
        coord.release(e)               # idle in order a, b, c
    coord.acquire(entries["a"])
    coord.release(entries["a"])        # a becomes most recent: b, c, a
    assert pool.num_free == 3 and coord.idle_blocks == 9
    evicted = coord.evict_until(6, keep=set())
    assert [e.chunk_hash for e in evicted] == ["b"]
    evicted = coord.evict_until(12, keep={"a"})
    assert [e.chunk_hash for e in evicted] == ["c"]
    assert set(coord.entries) == {"a"} and pool.num_free == 9


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch"]), st.integers(0, 7)), max_size=60))
def test_pool_refcounts_match_brute_force(ops):
    pool = BlockPool(8, enable_caching=False)
    held: list[list[int]] = []
    refs = [0] * 8
    for op, n in ops:
        if op == "alloc" and n <= pool.num_free and n > 0:
            blocks = pool.allocate(n)
            assert all(refs[b] == 0 for b in blocks)
            for b in blocks:
                refs[b] = 1
            held.append(blocks)
        elif op == "touch" and held:
            blocks = held[n % len(held)]
            pool.touch(blocks)
            for b in blocks:
                refs[b] += 1
            held.append(list(blocks))
        elif op == "free" and held:
            blocks = held.pop(n % len(held))
            pool.free(blocks)
            for b in blocks:
                refs[b] -= 1
        assert pool.num_free == sum(r == 0 for r in refs)
        assert pool.num_shared == sum(r >= 2 for r in refs)
    for blocks in held:
        pool.free(blocks)
    assert pool.num_free == 8


def test_prefix_hit_revives_a_freed_block():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2)
    pool.register(a, "h-a")
    pool.free([a, b])
    assert pool.lookup("h-a") == a
    pool.touch([a])                       # revived: off the free queue
    assert pool.num_free == 3 and pool.ref_cnt[a] == 1
    pool.free([a])
    pool.allocate(4)                      # reuse evicts the hash
    assert pool.lookup("h-a") is None


def test_hashing_module_does_not_import_torch():
    code = "import sys, mepic_ray.hashing as h; h.chunk_hash('m', [1, 2], 16); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunk_hash_is_stable_across_processes():
    code = "from mepic_ray.hashing import chunk_hash; print(chunk_hash('fp', [5, 6, 7], 16))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1
    from mepic_ray.hashing import chunk_hash
    assert chunk_hash("fp", [5, 6, 7], 16) != chunk_hash("fp", [5, 6, 7], 8)
    assert chunk_hash("fp", [5, 6, 7], 16) != chunk_hash("other", [5, 6, 7], 16)
