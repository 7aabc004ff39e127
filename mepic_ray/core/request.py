"""A request: its padded slot layout, block table and progress."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from mepic_ray.hashing import (KIND_CHUNK_FIRST, KIND_CHUNK_SHARED, KIND_PROMPT, PAD_TOKEN,
                               block_hash, chunk_hash)
from mepic_ray.sampling_params import SamplingParams
from mepic_ray.segments import Segment


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ChunkSpan:
    first_block: int              # logical block index in the request
    num_blocks: int
    chunk_hash: str
    padded_ids: tuple[int, ...]   # PAD_TOKEN in front, then the chunk's tokens
    num_tokens: int

    def real_slots(self, block_size: int) -> range:
        """Logical slots of the chunk's real (non-padding) tokens in the request."""
        start = self.first_block * block_size + len(self.padded_ids) - self.num_tokens
        return range(start, start + self.num_tokens)


@dataclass
class Layout:
    """Logical slots of the prompt. Chunks are front-padded and other segments
    (but the last) end-padded so every chunk owns whole blocks; padding slots
    have position -1 and real tokens keep contiguous positions."""
    token_ids: list[int]
    positions: list[int]
    block_kinds: list[int]
    block_hashes: list[str | None]
    chunks: list[ChunkSpan]
    chunk_of_block: dict[int, tuple[int, int]]   # block -> (chunk index, block in chunk)


def build_layout(segments: list[Segment], block_size: int, chunked: bool, fingerprint: str) -> Layout:
    ids: list[int] = []
    pos: list[int] = []
    chunks: list[ChunkSpan] = []
    next_pos = 0
    for i, seg in enumerate(segments):
        n = len(seg.token_ids)
        if chunked and seg.is_chunk:
            pad = (-n) % block_size
            padded = tuple([PAD_TOKEN] * pad + seg.token_ids)
            chunks.append(ChunkSpan(len(ids) // block_size, len(padded) // block_size,
                                    chunk_hash(fingerprint, seg.token_ids, block_size), padded, n))
            ids += padded
            pos += [-1] * pad + list(range(next_pos, next_pos + n))
        else:
            ids += seg.token_ids
            pos += list(range(next_pos, next_pos + n))
            if chunked and i < len(segments) - 1:
                pad = (-n) % block_size
                ids += [PAD_TOKEN] * pad
                pos += [-1] * pad
        next_pos += n
    num_blocks = -(-len(ids) // block_size)
    kinds = [KIND_PROMPT] * num_blocks
    chunk_of_block = {}
    for ci, c in enumerate(chunks):
        for j in range(c.num_blocks):
            kinds[c.first_block + j] = KIND_CHUNK_FIRST if j == 0 else KIND_CHUNK_SHARED
            chunk_of_block[c.first_block + j] = (ci, j)
    hashes: list[str | None] = []
    parent = fingerprint
    for b in range(num_blocks):
        blk = ids[b * block_size:(b + 1) * block_size]
        if len(blk) < block_size:   # only full blocks are cacheable
            hashes.append(None)
            break
        parent = block_hash(parent, kinds[b], blk)
        hashes.append(parent)
    return Layout(ids, pos, kinds, hashes, chunks, chunk_of_block)


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens whose KV was reused, not computed
    recomputed_tokens: int = 0    # reused chunk tokens recomputed in context
    compiled_tokens: int = 0      # chunk tokens computed standalone for this request
    computed_tokens: int = 0      # prompt tokens run through the model in context
    loaded_tokens: int = 0        # chunk tokens whose pages were loaded from the object-store tier
    # Where each distinct chunk's pages came from: this replica's pool, the store, or nowhere (compiled).
    chunks_pool: int = 0
    chunks_store: int = 0
    chunks_miss: int = 0
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finished_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival_s


@dataclass
class Request:
    request_id: str
    prompt: object
    params: SamplingParams
    segments: list[Segment]
    layout: Layout
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)    # one sampler.Logprob per output token, when asked
    # Filled at admission; released at finish.
    held_chunks: list = field(default_factory=list)
    private_blocks: list[int] = field(default_factory=list)
    reserved_blocks: int = 0
    computed_blocks: list[int] = field(default_factory=list)   # logical blocks computed this prefill
    query_slots: list[int] = field(default_factory=list)       # logical slots computed in context
    blend_candidates: list[int] = field(default_factory=list)  # cacheblend: slots it may skip
    copies: list = field(default_factory=list)                 # (chunk hash, pages) to fill from the host store
    compiled_slots: set = field(default_factory=set)           # chunk slots compiled for this request
    preloaded: dict = field(default_factory=dict)              # chunk hash -> KV fetched from the store tier
    prefilled: bool = False
    finish_reason: str | None = None
    text: str = ""
    stats: RequestStats = field(default_factory=RequestStats)

    def __post_init__(self) -> None:
        self.stats.arrival_s = time.perf_counter()
        self.stats.prompt_tokens = sum(1 for t in self.layout.token_ids if t != PAD_TOKEN)
        self.num_prompt_slots = len(self.layout.token_ids)
        self.token_ids = list(self.layout.token_ids)   # grows with decoded tokens
        self.positions = list(self.layout.positions)

    @property
    def num_slots(self) -> int:
        return len(self.token_ids)

    def set_computed(self, slots: list[int], block_size: int) -> None:
        """Account the slots computed in context: chunk ones are 'recomputed'; a
        token counts as cached only if neither computed nor compiled for us."""
        chunk_blocks = self.layout.chunk_of_block
        self.stats.computed_tokens = len(slots)
        self.stats.recomputed_tokens = sum(1 for s in slots if s // block_size in chunk_blocks)
        self.stats.cached_tokens = self.stats.prompt_tokens - len(self.compiled_slots.union(slots))

    def append_token(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)
        self.positions.append(self.stats.prompt_tokens + len(self.output_ids) - 1)
