"""Resident chunks: canonical NoPE pages shared by every request that uses them.

A chunk is ref-counted as a whole (and each of its pages per request, in the
block pool). Zero-ref chunks stay resident and are evicted least recently used,
as whole chunks, only when the pool needs their pages.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from mepic_ray.core.block_pool import BlockPool


class ChunkHashCollisionError(RuntimeError):
    """Two different chunks produced the same hash; refuse rather than mix KV."""


@dataclass
class ChunkEntry:
    chunk_hash: str
    token_ids: tuple[int, ...]
    blocks: list[int]
    ref: int = 0
    ready: bool = False          # canonical pages hold computed KV
    hits: int = field(default=0)


class ChunkCoordinator:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.entries: dict[str, ChunkEntry] = {}
        self.idle: OrderedDict[str, ChunkEntry] = OrderedDict()   # zero-ref, LRU first
        self.idle_blocks = 0
        # Called with each evicted chunk while its pages still hold its KV (demotion to the store tier).
        self.on_evict: Callable[[ChunkEntry], None] | None = None

    def lookup(self, chunk_hash: str, token_ids: tuple[int, ...]) -> ChunkEntry | None:
        e = self.entries.get(chunk_hash)
        if e is not None and e.token_ids != token_ids:
            raise ChunkHashCollisionError(f"chunk hash {chunk_hash} maps to two different token sequences")
        return e

    def create(self, chunk_hash: str, token_ids: tuple[int, ...], num_blocks: int) -> ChunkEntry:
        blocks = self.pool.allocate(num_blocks)
        self.pool.set_chunk_owned(blocks, True)
        e = ChunkEntry(chunk_hash, token_ids, blocks, ref=1)
        self.entries[chunk_hash] = e
        return e

    def acquire(self, e: ChunkEntry) -> None:
        if e.ref == 0:
            del self.idle[e.chunk_hash]
            self.idle_blocks -= len(e.blocks)
        self.pool.touch(e.blocks)
        e.ref += 1
        e.hits += 1

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

    def evict_until(self, num_free: int, keep: set[str], demote: bool = True) -> list[ChunkEntry]:
        evicted = []
        for h in list(self.idle):
            if self.pool.num_free >= num_free:
                break
            if h in keep:
                continue
            e = self.idle.pop(h)
            self.idle_blocks -= len(e.blocks)
            if demote and self.on_evict is not None:
                self.on_evict(e)
            self._drop(e)
            evicted.append(e)
        return evicted

    def _drop(self, e: ChunkEntry) -> None:
        del self.entries[e.chunk_hash]
        self.pool.set_chunk_owned(e.blocks, False)
