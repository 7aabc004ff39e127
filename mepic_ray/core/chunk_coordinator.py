"""Resident chunks: canonical blocks (keys at chunk-local positions) shared by every request that uses them.

A chunk is ref-counted as a whole (and each of its blocks per request, in the
block pool). Zero-ref chunks stay resident and are evicted least recently used,
as whole chunks, only when the pool needs their blocks.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from mepic_ray.core.block_pool import BlockPool


class ChunkHashCollisionError(RuntimeError):
    """Two different chunks produced the same hash; refuse rather than mix KV."""


@dataclass
class ChunkEntry:
    chunk_hash: str
    token_ids: tuple[int, ...]
    blocks: list[int]
    ref: int = 0
    ready: bool = False          # canonical blocks hold computed KV


class ChunkCoordinator:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.entries: dict[str, ChunkEntry] = {}
        self.idle: OrderedDict[str, ChunkEntry] = OrderedDict()   # zero-ref, LRU first
        self.idle_blocks = 0
        self.version = 0     # bumped whenever the set of resident chunks changes

    def lookup(self, chunk_hash: str, token_ids: tuple[int, ...]) -> ChunkEntry | None:
        e = self.entries.get(chunk_hash)
        if e is not None and e.token_ids != token_ids:
            raise ChunkHashCollisionError(f"chunk hash {chunk_hash} maps to two different token sequences")
        return e

    def create(self, chunk_hash: str, token_ids: tuple[int, ...], num_blocks: int = 0,
               blocks: list[int] | None = None) -> ChunkEntry:
        """A new chunk holding one reference, on ``num_blocks`` fresh blocks or on ``blocks``."""
        blocks = self.pool.allocate(num_blocks) if blocks is None else blocks
        self.pool.set_chunk_owned(blocks, True)
        e = ChunkEntry(chunk_hash, token_ids, blocks, ref=1)
        self.entries[chunk_hash] = e
        self.version += 1
        return e

    def acquire(self, e: ChunkEntry) -> None:
        if e.ref == 0:
            del self.idle[e.chunk_hash]
            self.idle_blocks -= len(e.blocks)
        self.pool.touch(e.blocks)
        e.ref += 1

    def release(self, e: ChunkEntry) -> None:
        self.pool.free(e.blocks)
        e.ref -= 1
        if e.ref == 0:
            if not e.ready:    # never finished compiling: nothing worth keeping
                self._drop(e)
                return
            self.idle[e.chunk_hash] = e
            self.idle_blocks += len(e.blocks)

    def evictable_blocks(self, keep: set[str]) -> int:
        return self.idle_blocks - sum(len(self.idle[h].blocks) for h in keep if h in self.idle)

    def evict_until(self, num_free: int, keep: set[str]) -> list[ChunkEntry]:
        """Evict idle chunks, least recently used first, until ``num_free`` blocks are free.
        The evicted entries' blocks still hold their KV until something allocates them."""
        evicted = []
        for h in list(self.idle):
            if self.pool.num_free >= num_free:
                break
            if h in keep:
                continue
            e = self.idle.pop(h)
            self.idle_blocks -= len(e.blocks)
            self._drop(e)
            evicted.append(e)
        return evicted

    def _drop(self, e: ChunkEntry) -> None:
        del self.entries[e.chunk_hash]
        self.version += 1
        self.pool.set_chunk_owned(e.blocks, False)
