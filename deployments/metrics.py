"""Ray metrics exported by engine replicas (``ray_mepic_*`` on the node's metrics port)."""
from __future__ import annotations

from ray.util import metrics

_TTFT_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class EngineMetrics:
    def __init__(self, replica: str):
        tags = {"replica": replica}
        self.blocks = metrics.Gauge("mepic_kv_blocks", "KV blocks by state", tag_keys=("replica", "state"))
        self.tokens = metrics.Counter("mepic_prompt_tokens", "prompt tokens by how their KV was obtained",
                                      tag_keys=("replica", "kind"))
        self.ttft = metrics.Histogram("mepic_ttft_seconds", "time to first token", boundaries=_TTFT_BOUNDS,
                                      tag_keys=("replica",))
        self.e2e = metrics.Histogram("mepic_e2e_seconds", "request latency", boundaries=_TTFT_BOUNDS,
                                     tag_keys=("replica",))
        self.chunk_hits = metrics.Counter("mepic_chunk_hits", "chunks a request needed, by the tier that had them",
                                          tag_keys=("replica", "tier"))
        self.store_events = metrics.Counter("mepic_store_events", "object-store tier activity on this replica "
                                            "(demotions, loads, load bytes and microseconds, hits, misses, errors)",
                                            tag_keys=("replica", "event"))
        # The scheduler: steps, tokens they computed (their ratio is tokens per step), and
        # preemptions; prefill steps per request.
        self.engine_events = metrics.Counter("mepic_engine_events", "engine steps, tokens computed by them, "
                                             "and preemptions", tag_keys=("replica", "event"))
        self.prefill_steps = metrics.Histogram("mepic_prefill_steps", "steps a request's prefill was split over",
                                               boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("replica",))
        for m in (self.blocks, self.tokens, self.ttft, self.e2e, self.chunk_hits, self.store_events,
                  self.engine_events, self.prefill_steps):
            m.set_default_tags(tags)
        self._seen: dict[tuple[str, str], int] = {}

    def _count(self, counter, tag: str, totals: dict) -> None:
        """Counters from the engine's running totals: add what is new since last time."""
        for event, total in totals.items():
            delta = total - self._seen.get((tag, event), 0)
            if delta > 0:
                counter.inc(delta, tags={tag: event})
                self._seen[(tag, event)] = total

    def observe_stats(self, stats: dict, store_counts: dict | None = None) -> None:
        for state in ("used", "shared", "free", "idle_chunk", "cached_chunk"):
            self.blocks.set(stats[f"{state}_blocks"], tags={"state": state})
        self._count(self.store_events, "event", dict(store_counts or {}))
        self._count(self.engine_events, "event", {k: stats[k] for k in ("steps", "computed_tokens", "preemptions")})

    def observe_request(self, out) -> None:
        s = out.stats
        for kind, n in (("cached", s.cached_tokens), ("recomputed", s.recomputed_tokens),
                        ("compiled", s.compiled_tokens), ("computed", s.computed_tokens),
                        ("loaded", s.loaded_tokens)):
            if n:
                self.tokens.inc(n, tags={"kind": kind})
        for tier, n in (("hbm", s.chunks_pool), ("object_store", s.chunks_store), ("miss", s.chunks_miss)):
            if n:
                self.chunk_hits.inc(n, tags={"tier": tier})
        if s.prefill_steps:
            self.prefill_steps.observe(s.prefill_steps)
        if s.ttft_s is not None:
            self.ttft.observe(s.ttft_s)
        if s.e2e_s is not None:
            self.e2e.observe(s.e2e_s)
