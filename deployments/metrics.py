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
        for m in (self.blocks, self.tokens, self.ttft, self.e2e, self.chunk_hits, self.store_events):
            m.set_default_tags(tags)
        self._store_seen: dict[str, int] = {}

    def observe_stats(self, stats: dict, store_counts: dict | None = None) -> None:
        for state in ("used", "shared", "free", "idle_chunk", "cached_chunk"):
            self.blocks.set(stats[f"{state}_blocks"], tags={"state": state})
        for event, total in dict(store_counts or {}).items():
            delta = total - self._store_seen.get(event, 0)
            if delta > 0:
                self.store_events.inc(delta, tags={"event": event})
                self._store_seen[event] = total

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
        if s.ttft_s is not None:
            self.ttft.observe(s.ttft_s)
        if s.e2e_s is not None:
            self.e2e.observe(s.e2e_s)
