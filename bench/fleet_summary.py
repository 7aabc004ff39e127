"""One simulator run's figures (``bench/fleet_sim.py``): hit rate overall, per window and
its steady-state slope, misses by cause, chunk copies, load spread, TTFT and decision
percentiles."""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.common import pct

if TYPE_CHECKING:
    from bench.fleet_sim import RunResult


def summarize(res: RunResult, window: int, warmup: float = 0.2) -> dict:
    recs = res.records
    wins = []
    for i in range(0, len(recs) - window + 1, window):
        part = recs[i:i + window]
        wins.append(sum(r.hits for r in part) / max(1, sum(r.chunks for r in part)))
    steady = wins[int(len(wins) * warmup):] or wins
    slope = 0.0
    if len(steady) > 1:    # least squares, per 10,000 requests
        xs = list(range(len(steady)))
        mx, my = statistics.mean(xs), statistics.mean(steady)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, steady)) / sum((x - mx) ** 2 for x in xs) * 10_000 / window
    tail = res.copies_samples[int(len(res.copies_samples) * warmup):] or res.copies_samples
    mean_load = statistics.mean(res.load_area) or 1.0
    steady_recs = recs[int(len(recs) * warmup):]
    uses = max(1, sum(r.chunks for r in recs))
    return {
        "policy": res.policy, "requests": len(recs), "truncated": res.truncated,
        "hit_rate": sum(r.hits for r in recs) / uses,
        # Misses by where the chunk was: nowhere yet, in another pool, evicted from every pool.
        "miss_cold": sum(r.cold for r in recs) / uses,
        "miss_elsewhere": sum(r.elsewhere for r in recs) / uses,
        "miss_gone": sum(r.chunks - r.hits - r.cold - r.elsewhere for r in recs) / uses,
        "steady_hit_rate": sum(r.hits for r in steady_recs) / max(1, sum(r.chunks for r in steady_recs)),
        "hit_rate_windows": wins, "steady_slope_per_10k": slope,
        "copies_per_chunk": statistics.mean(c / max(1, d) for c, d, _ in tail) if tail else 0.0,
        "chunk_kv_blocks": statistics.mean(b for _, _, b in tail) if tail else 0,
        "max_over_mean_served": max(res.served) / statistics.mean(res.served),
        "max_over_mean_load": max(res.load_area) / mean_load,
        "ttft_p50_s": pct([r.ttft_s for r in recs], 0.5), "ttft_p99_s": pct([r.ttft_s for r in recs], 0.99),
        "decision_p50_ms": pct([r.decision_s for r in recs], 0.5) * 1e3,
        "decision_p99_ms": pct([r.decision_s for r in recs], 0.99) * 1e3,
        "router_memory": res.router_memory, "decisions": res.decisions,
        "probes_per_request": None if res.probes is None else res.probes / max(1, sum(res.decisions.values())),
        "sim_duration_s": res.duration_s, "wall_s": res.wall_s,
    }
