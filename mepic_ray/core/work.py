"""What one step must do, as the scheduler hands it to the engine: the KV operations
around the forward (demote, load, copy), the selection probes, and the forward's
sequences (chunk compile pieces, prefill pieces, decodes), in the order the engine
carries them out."""
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
    """Compute a chunk standalone (attending only to itself) into ``block_table``, over
    one or more steps: ``scheduled`` of its real slots are in this step's forward or earlier."""
    chunk_hash: str
    padded_ids: tuple[int, ...]
    block_table: list[int]
    entry: ChunkEntry | None = None          # canonical chunk (shared modes)
    scratch_blocks: list[int] = field(default_factory=list)   # recomputed leading blocks, freed after
    host_copy: bool = False                  # private modes: offer a host copy for later requests
    publish: bool = False                    # write the chunk through to the object-store tier
    scheduled: int = 0

    @property
    def slots(self) -> range:
        return range(sum(1 for t in self.padded_ids if t < 0), len(self.padded_ids))

    @property
    def positions(self) -> list[int]:
        n_pad = self.slots.start
        return [-1] * n_pad + list(range(len(self.padded_ids) - n_pad))

    @property
    def remaining(self) -> int:
        return len(self.slots) - self.scheduled


@dataclass
class CompilePiece:
    """The next ``len(query_slots)`` slots of a compile; ``last``: the compile ends here."""
    job: CompileJob
    query_slots: list[int]

    @property
    def last(self) -> bool:
        return self.job.remaining == 0 and self.query_slots[-1] == self.job.slots[-1]


@dataclass
class CopyIn:
    """Fill a request's private blocks from a chunk's host copy."""
    chunk_hash: str
    blocks: list[int]


@dataclass
class Probe:
    """A forward up to the check layer over a request's in-context slots and its
    candidate slots, scoring how far each candidate's K there deviates from the cached
    K. The KV manager turns the scores into the slots the prefill recomputes, and the
    request's prefill piece of this step (``seq``, if any) takes its first of them."""
    request: Request
    block_table: list[int]
    query_slots: list[int]
    candidates: list[int]
    write_candidates: bool        # private copies may be overwritten; shared pages never
    max_todo: int                 # the most slots the prefill can have to compute after it
    seq: "ScheduledSeq | None" = None


@dataclass
class ScheduledSeq:
    """One sequence of this step's forward: a piece of a prefill or a decode.
    ``samples``: its last slot ends the work, so a token is sampled from it."""
    request: Request
    block_table: list[int]
    query_slots: list[int]
    samples: bool = True
    num_tokens: int = 0           # a piece taken after a probe: how many of the slots it picks


@dataclass
class SchedulerOutput:
    demotions: list[Demotion] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    copies: list[CopyIn] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    compiles: list[CompilePiece] = field(default_factory=list)
    prefills: list[ScheduledSeq] = field(default_factory=list)
    decodes: list[ScheduledSeq] = field(default_factory=list)
    dropped_copies: list[str] = field(default_factory=list)   # host copies to free after the step
    failed: list[tuple[Request, str]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_tokens: int = 0           # every token the step computes (probes scaled by their depth)

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes or self.compiles or self.probes)
