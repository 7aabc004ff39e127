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
    computed_blocks: list[int] = field(default_factory=list)   # logical blocks computed in context
    spare_blocks: list[int] = field(default_factory=list)      # private pages for the blocks a probe picks
    # The prefill's work, in order: the compiles it waits for, then a probe (selective
    # modes), then ``todo``: the slots still to compute in context.
    compiles: list = field(default_factory=list)               # work.CompileJob
    probe: tuple | None = None                                 # (candidate slots, how many to pick)
    todo: list[int] = field(default_factory=list)
    compiled_slots: frozenset = frozenset()                    # chunk slots compiled for this request
    prefilled: bool = False                                    # the last prefill piece is scheduled
    # Runs of canonical chunk pages in the block table: (pages, first logical slot, its
    # chunk-local position), for attention to read each run once for all its readers.
    shared_runs: list = field(default_factory=list)


@dataclass
class Plan:
    # Per logical block: (HIT, physical block) | (SHARED, chunk hash, block in chunk) | (COMPUTE,) | (COPY,)
    sources: list[tuple]
    reused: dict[str, ChunkEntry]      # resident chunks it shares
    new_chunks: dict[str, ChunkSpan]   # chunks it creates (loaded or compiled), first occurrence
    host_copied: set[str]              # private modes: chunks copied in from a host copy
    allocs: int                        # blocks taken from the free queue now
    revived: int                       # prefix hits that sit in the free queue
    selected: int = 0                  # shared blocks a probe picks to recompute into private pages
