"""A consistent, immutable picture of the engine's pool and queues, taken on the engine
thread after each step. Other threads (the Serve replica's stats and routing calls)
read the last one instead of walking structures the engine thread is changing."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class EngineSnapshot:
    stats: Mapping[str, int]
    chunks: Mapping[str, int]    # resident chunk hash -> real tokens, for the router
    chunks_version: int


def take_snapshot(engine, prev: EngineSnapshot | None = None) -> EngineSnapshot:
    kv = engine.kv
    pool, chunks = kv.pool, kv.chunks
    if prev is not None and prev.chunks_version == chunks.version:
        resident = prev.chunks
    else:
        resident = MappingProxyType({h: sum(1 for t in e.token_ids if t >= 0) for h, e in chunks.entries.items()})
    stats = {
        "total_blocks": pool.num_blocks,
        "free_blocks": pool.num_free,
        "used_blocks": pool.num_blocks - pool.num_free - chunks.idle_blocks,
        "shared_blocks": pool.num_shared,
        "peak_used_blocks": pool.peak_used,
        "cached_chunk_blocks": sum(len(e.blocks) for e in chunks.entries.values()),
        "idle_chunk_blocks": chunks.idle_blocks,
        "num_chunks": len(chunks.entries),
        "preemptions": engine.scheduler.num_preemptions,
        "steps": engine.num_steps,
        "step_tokens": engine.step_tokens,
        "computed_tokens": engine.computed_tokens,
        "waiting": len(engine.scheduler.waiting),
        "running": len(engine.scheduler.running),
        "prefilling": engine.prefilling,
        "aborted": engine.num_aborted,
    }
    return EngineSnapshot(MappingProxyType(stats), resident, chunks.version)
