"""A prompt's padded slot layout: chunks front-padded onto block boundaries, other
segments (but the last) end-padded, each block's kind and prefix-chain hash."""
from __future__ import annotations

from dataclasses import dataclass

from mepic_ray.hashing import (KIND_CHUNK_FIRST, KIND_CHUNK_SHARED, KIND_PROMPT, PAD_TOKEN,
                               block_hash, chunk_hash)
from mepic_ray.segments import Segment


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
    fingerprint: str = ""                        # the model's: the root of the block-hash chain

    def chunk_spans(self, block_size: int) -> list[tuple[int, int, int]]:
        """Each chunk's (first slot, end slot, offset): its keys are stored at chunk-local
        positions (0 at its first real token), ``offset`` before their positions here."""
        return [(c.first_block * block_size, (c.first_block + c.num_blocks) * block_size,
                 self.positions[c.real_slots(block_size).start]) for c in self.chunks]

    def extended(self, token_ids: list[int], positions: list[int], block_size: int) -> "Layout":
        """The layout with tokens appended to its last (prompt text) segment: a preempted
        request's answer so far, recomputed like prompt text when it resumes."""
        ids, pos = self.token_ids + token_ids, self.positions + positions
        full = sum(1 for h in self.block_hashes if h is not None)
        num_blocks = -(-len(ids) // block_size)
        kinds = self.block_kinds[:full] + [KIND_PROMPT] * (num_blocks - full)
        return Layout(ids, pos, kinds, _chain(ids, kinds, block_size, self.fingerprint, self.block_hashes[:full]),
                      self.chunks, self.chunk_of_block, self.fingerprint)


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
    return Layout(ids, pos, kinds, _chain(ids, kinds, block_size, fingerprint, []), chunks, chunk_of_block,
                  fingerprint)


def _chain(ids: list[int], kinds: list[int], block_size: int, fingerprint: str, known: list[str]) -> list[str | None]:
    """Each block's prefix-chain hash, continuing after the ``known`` leading ones."""
    hashes = list(known)
    parent = hashes[-1] if hashes else fingerprint
    for b in range(len(hashes), len(kinds)):
        blk = ids[b * block_size:(b + 1) * block_size]
        if len(blk) < block_size:   # only full blocks are cacheable
            hashes.append(None)
            break
        parent = block_hash(parent, kinds[b], blk)
        hashes.append(parent)
    return hashes
