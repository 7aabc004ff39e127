"""Physical KV blocks: ref counts, an O(1) LRU free queue and the prefix-cache map.

As in vLLM v1, a block whose ref count drops to zero keeps its hash and sits in
the free queue until it is reused, so a later identical prefix can revive it.
Blocks owned by a resident chunk never enter the free queue while the chunk is
resident; the chunk coordinator hands them back on eviction.
"""
from __future__ import annotations

from collections import OrderedDict


class OutOfBlocksError(RuntimeError):
    """Allocation beyond the free blocks: the admission check must prevent this."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[str | None] = [None] * num_blocks
        self.chunk_owned = [False] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_to_block: dict[str, int] = {}
        self.num_shared = 0           # blocks with ref >= 2
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def lookup(self, h: str) -> int | None:
        return self.hash_to_block.get(h) if self.enable_caching else None

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise OutOfBlocksError(f"need {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)   # least recently freed first
            if self.block_hash[b] is not None:
                del self.hash_to_block[self.block_hash[b]]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def num_free_uncached(self) -> int:
        """Free blocks that hold no prefix-cache hash (O(free): for warming, not the hot path)."""
        return sum(1 for b in self.free_queue if self.block_hash[b] is None)

    def allocate_uncached(self, n: int) -> list[int]:
        """Like ``allocate`` but only blocks without a prefix-cache hash, so no cached prefix is lost."""
        out = [b for b in self.free_queue if self.block_hash[b] is None][:n]
        if len(out) < n:
            raise OutOfBlocksError(f"need {n} uncached blocks, {len(out)} free")
        for b in out:
            del self.free_queue[b]
            self.ref_cnt[b] = 1
        return out

    def touch(self, blocks: list[int]) -> None:
        """Take one more reference on blocks that may be sitting in the free queue."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                self.free_queue.pop(b, None)
            self.ref_cnt[b] += 1
            if self.ref_cnt[b] == 2:
                self.num_shared += 1

    def free(self, blocks: list[int]) -> None:
        # Reverse order: a sequence's tail blocks are evicted before its head,
        # which other prompts are more likely to share.
        for b in reversed(blocks):
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            if self.ref_cnt[b] == 2:
                self.num_shared -= 1
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0 and not self.chunk_owned[b]:
                self.free_queue[b] = None

    def register(self, block: int, h: str) -> None:
        if self.enable_caching and h not in self.hash_to_block and self.block_hash[block] is None:
            self.hash_to_block[h] = block
            self.block_hash[block] = h

    def drop_cached_hashes(self) -> None:
        for b in self.free_queue:
            if self.block_hash[b] is not None:
                del self.hash_to_block[self.block_hash[b]]
                self.block_hash[b] = None

    def set_chunk_owned(self, blocks: list[int], owned: bool) -> None:
        for b in blocks:
            self.chunk_owned[b] = owned
            if not owned and self.ref_cnt[b] == 0:
                self.free_queue[b] = None

    def update_peak(self, idle_chunk_blocks: int) -> int:
        used = self.num_blocks - len(self.free_queue) - idle_chunk_blocks
        self.peak_used = max(self.peak_used, used)
        return used
