"""What one step must do, as the scheduler hands it to the engine: the sequences to run
and the KV operations around them (demote, load, compile, copy), in the order the
engine carries them out."""
from __future__ import annotations

from dataclasses import dataclass, field

from mepic_ray.core.chunk_coordinator import ChunkEntry
from mepic_ray.core.request import Request


@dataclass
class Demotion:
    """An evicted chunk's blocks, to export to the object-store tier before this step
    writes anything into them."""
    chunk_hash: str
    padded_ids: tuple[int, ...]
    shared_tokens: int
    blocks: list[int]


@dataclass
class LoadJob:
    """Copy a chunk's KV fetched from the object-store tier into its new canonical blocks."""
    entry: ChunkEntry
    kv: object


@dataclass
class CompileJob:
    """Compute a chunk standalone (attending only to itself) into ``block_table``."""
    chunk_hash: str
    padded_ids: tuple[int, ...]
    block_table: list[int]
    entry: ChunkEntry | None = None          # canonical chunk (shared modes)
    scratch_blocks: list[int] = field(default_factory=list)   # recomputed leading blocks, freed after
    host_copy: bool = False                  # private modes: keep a host copy for later requests
    publish: bool = False                    # write the chunk through to the object-store tier


@dataclass
class CopyIn:
    """Fill a request's private blocks from a chunk's host copy."""
    chunk_hash: str
    blocks: list[int]


@dataclass
class ScheduledSeq:
    """One sequence of this step's forward: a prefill (many query slots) or a decode (one)."""
    request: Request
    block_table: list[int]
    query_slots: list[int]
    blend_candidates: list[int] = field(default_factory=list)   # cacheblend: slots it may skip
    compiled_slots: frozenset = frozenset()                     # chunk slots compiled for it
    # MEPIC block selection: shared logical blocks a probe scores, and how many to pick
    # (recomputed into private pages by this step's prefill).
    probe_blocks: list[int] = field(default_factory=list)
    num_selected: int = 0

    def account(self, computed: list[int], chunk_blocks, block_size: int) -> None:
        """Prefill accounting: chunk slots computed in context are 'recomputed'; a token
        counts as cached only if neither computed nor compiled for this request. The
        slots of a resumed answer are output, not prompt: not counted."""
        req = self.request
        st = req.stats
        end = req.num_prompt_slots - req.num_resumed
        computed = [s for s in computed if s < end]
        st.computed_tokens = len(computed)
        st.recomputed_tokens = sum(1 for s in computed if s // block_size in chunk_blocks)
        st.cached_tokens = st.prompt_tokens - len(self.compiled_slots.union(computed))


@dataclass
class SchedulerOutput:
    prefills: list[ScheduledSeq] = field(default_factory=list)
    decodes: list[ScheduledSeq] = field(default_factory=list)
    demotions: list[Demotion] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    compiles: list[CompileJob] = field(default_factory=list)
    copies: list[CopyIn] = field(default_factory=list)
    dropped_copies: list[str] = field(default_factory=list)   # host copies to free after the step
    failed: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes
