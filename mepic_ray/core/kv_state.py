"""The KV cache manager's records: a request's KV state and an admission plan."""
from __future__ import annotations

from dataclasses import dataclass, field

from mepic_ray.core.chunk_coordinator import ChunkEntry
from mepic_ray.core.layout import ChunkSpan

HIT, SHARED, COMPUTE, COPY = "hit", "shared", "compute", "copy"


class RequestTooLargeError(ValueError):
    """The request can never fit in the KV pool, even with everything else evicted."""


@dataclass
class RequestKV:
    block_table: list[int] = field(default_factory=list)
    private_blocks: list[int] = field(default_factory=list)   # this request's references, freed at the end
    held_chunks: list[ChunkEntry] = field(default_factory=list)
    reserved_blocks: int = 0                                   # for decode tokens still to come
    computed_blocks: list[int] = field(default_factory=list)   # logical blocks computed in context
    spare_blocks: list[int] = field(default_factory=list)      # private pages for the blocks a probe picks


@dataclass
class Plan:
    # Per logical block: (HIT, physical block) | (SHARED, chunk hash, block in chunk) | (COMPUTE,) | (COPY,)
    sources: list[tuple]
    reused: dict[str, ChunkEntry]      # resident chunks it shares
    new_chunks: dict[str, ChunkSpan]   # chunks it creates (loaded or compiled), first occurrence
    host_copied: set[str]              # private modes: chunks copied in from a host copy
    allocs: int                        # blocks taken from the free queue now
    revived: int                       # prefix hits that sit in the free queue
    reserve: int
    query_tokens: int
    selected: int = 0                  # shared blocks a probe picks to recompute into private pages
