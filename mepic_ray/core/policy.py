"""One reuse policy per mode: what a mode means for chunk KV, in one place.

The KV cache manager asks the policy whether chunks are laid out on block
boundaries, whether their canonical blocks are shared or each request gets a
private copy, which of their slots are recomputed in context, and whether prefix
caching is on, and whether a probe at a check layer picks what is recomputed
(CacheBlend's tokens, MEPIC's blocks). Each mode's own knobs live in its options
dataclass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from mepic_ray.core.layout import ChunkSpan
from mepic_ray.hashing import PAD_TOKEN


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class MepicOptions:
    recompute_blocks: int = 1      # leading blocks of each chunk recomputed in context, never shared
    # ... or more: enough leading blocks to hold this many of the chunk's real tokens. A
    # chunk is front-padded, so its first block holds only len % block_size of them.
    recompute_tokens: int = 0
    # Block-granular selective recompute: of each request's shared chunk blocks, this
    # fraction (rounded up) is recomputed in context into private pages: those whose K at
    # ``check_layer`` deviates most from their canonical pages. The rest stay shared.
    block_ratio: float = 0.0
    check_layer: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.block_ratio, bool) or not isinstance(self.block_ratio, (int, float)) \
                or not 0.0 <= self.block_ratio <= 1.0:
            raise ValueError("mepic block_ratio must be in [0, 1]")
        # Layer 0's K and V are projections of the token alone (K rotated at its stored,
        # chunk-local position), the same in any context: the first layer where a block can deviate is 1.
        if isinstance(self.check_layer, bool) or not isinstance(self.check_layer, int) or self.check_layer < 1:
            raise ValueError("mepic check_layer must be an integer >= 1")
        if isinstance(self.recompute_blocks, bool) or not isinstance(self.recompute_blocks, int) \
                or self.recompute_blocks < 1:
            raise ValueError("mepic recompute_blocks must be an integer >= 1 (the first block is always recomputed)")
        if isinstance(self.recompute_tokens, bool) or not isinstance(self.recompute_tokens, int) \
                or self.recompute_tokens < 0:
            raise ValueError("mepic recompute_tokens must be an integer >= 0")


@dataclass(frozen=True)
class EpicOptions:
    recompute_tokens: int = 16     # leading real tokens of each chunk recomputed in context
    host_copy_bytes: int = 1 << 30  # chunk KV kept off the pool, copied into each request's blocks

    def __post_init__(self) -> None:
        if isinstance(self.recompute_tokens, bool) or not isinstance(self.recompute_tokens, int) \
                or self.recompute_tokens < 0:
            raise ValueError("epic recompute_tokens must be an integer >= 0")
        if self.host_copy_bytes <= 0:
            raise ValueError("host_copy_bytes must be positive")


@dataclass(frozen=True)
class CacheBlendOptions:
    ratio: float = 0.15            # of each request's chunk tokens, chosen by K deviation
    check_layer: int = 1
    host_copy_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError("cacheblend ratio must be in [0, 1]")
        if isinstance(self.check_layer, bool) or not isinstance(self.check_layer, int) or self.check_layer < 0:
            raise ValueError("cacheblend check_layer must be an integer >= 0")
        if self.host_copy_bytes <= 0:
            raise ValueError("host_copy_bytes must be positive")


class ReusePolicy:
    name = ""
    Options: type = NoOptions
    chunked = True           # chunks sit on block boundaries and keep their KV as chunks
    shares_chunks = False    # canonical blocks shared by every request (else a private copy each)
    prefix_caching = False

    def __init__(self, options) -> None:
        self.options = options

    def recomputed_blocks(self, padded_ids: tuple[int, ...], block_size: int) -> int:
        """Leading blocks of a shared chunk computed in context per request (not canonical
        blocks). A function of the chunk's padded tokens only, so every replica agrees on
        which of its blocks are canonical."""
        return 0

    def window(self) -> dict:
        """What ``recomputed_blocks`` depends on besides the chunk (stored with tier objects)."""
        return {}

    def recompute_slots(self, chunk: ChunkSpan, block_size: int) -> list[int]:
        """Private-copy modes: the chunk's slots recomputed in context over its copy (or,
        with a selection probe, the candidates it picks from)."""
        return []

    def selection(self) -> tuple[float, int] | None:
        """(ratio, check layer) when a probe, a forward up to the check layer, picks what
        of the reused chunks is recomputed in context."""
        return None

    def pick(self, candidates: list[int], scores: list[float], block_size: int) -> list[int]:
        """The candidate slots to recompute, from each one's K deviation at the check layer."""
        raise NotImplementedError

    def max_picked(self, candidates: list[int], block_size: int) -> int:
        """How many slots ``pick`` may return, known before the probe runs."""
        raise NotImplementedError


class FullPolicy(ReusePolicy):
    name, chunked = "full", False


class PrefixPolicy(ReusePolicy):
    # vLLM-style prefix caching: chunks are ordinary prompt text.
    name, chunked, prefix_caching = "prefix", False, True


class NaivePolicy(ReusePolicy):
    name, shares_chunks, prefix_caching = "naive", True, True


class MepicPolicy(ReusePolicy):
    name, Options, shares_chunks, prefix_caching = "mepic", MepicOptions, True, True

    def recomputed_blocks(self, padded_ids: tuple[int, ...], block_size: int) -> int:
        o = self.options
        if not o.recompute_tokens:
            return o.recompute_blocks
        pad = sum(1 for t in padded_ids[:block_size] if t == PAD_TOKEN)
        return max(o.recompute_blocks, -(-(pad + o.recompute_tokens) // block_size))

    def window(self) -> dict:
        return {"recompute_blocks": self.options.recompute_blocks, "recompute_tokens": self.options.recompute_tokens}

    def selection(self) -> tuple[float, int] | None:
        o = self.options
        return (float(o.block_ratio), o.check_layer) if o.block_ratio > 0 else None

    def num_picked_blocks(self, num_shared_blocks: int) -> int:
        return math.ceil(self.options.block_ratio * num_shared_blocks)

    def pick(self, candidates: list[int], scores: list[float], block_size: int) -> list[int]:
        # Whole blocks, by their real slots' mean deviation: a picked block moves to a
        # private page; the others stay shared.
        per_block: dict[int, list[float]] = {}
        for slot, score in zip(candidates, scores):
            per_block.setdefault(slot // block_size, []).append(score)
        ranked = sorted(per_block, key=lambda b: -sum(per_block[b]) / len(per_block[b]))
        picked = set(ranked[:self.num_picked_blocks(len(per_block))])
        return [s for s in candidates if s // block_size in picked]

    def max_picked(self, candidates: list[int], block_size: int) -> int:
        return self.num_picked_blocks(len({s // block_size for s in candidates})) * block_size


# The private-copy baselines run without prefix caching, as LMCache's blending does
# (the two do not work together there).
class EpicPolicy(ReusePolicy):
    name, Options = "epic", EpicOptions

    def recompute_slots(self, chunk: ChunkSpan, block_size: int) -> list[int]:
        return list(chunk.real_slots(block_size)[:self.options.recompute_tokens])


class CacheBlendPolicy(ReusePolicy):
    name, Options = "cacheblend", CacheBlendOptions

    def recompute_slots(self, chunk: ChunkSpan, block_size: int) -> list[int]:
        return list(chunk.real_slots(block_size))   # candidates; the check layer keeps `ratio` of them

    def selection(self) -> tuple[float, int]:
        return self.options.ratio, self.options.check_layer

    def pick(self, candidates: list[int], scores: list[float], block_size: int) -> list[int]:
        n = self.max_picked(candidates, block_size)
        return sorted(candidates[i] for i in sorted(range(len(scores)), key=lambda i: -scores[i])[:n])

    def max_picked(self, candidates: list[int], block_size: int) -> int:
        return math.ceil(self.options.ratio * len(candidates))


POLICIES: dict[str, type[ReusePolicy]] = {p.name: p for p in (FullPolicy, PrefixPolicy, NaivePolicy, EpicPolicy,
                                                                CacheBlendPolicy, MepicPolicy)}
MODES = tuple(POLICIES)


def make_policy(mode: str, options: dict | None = None) -> ReusePolicy:
    if mode not in POLICIES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cls = POLICIES[mode]
    options = dict(options or {})
    known = {f.name for f in fields(cls.Options)}
    if set(options) - known:
        raise ValueError(f"unknown options for mode {mode!r}: {sorted(set(options) - known)} "
                         f"(it takes {sorted(known) or 'none'})")
    return cls(cls.Options(**options))
