"""Chunk-affinity request router for Ray Serve: a thin adapter over the Ray-free
``router.ranking.ChunkAffinityRanker``.

The ingress puts a ``mepic_ray.routing.RoutingInfo`` in each request payload
(``payload["routing"]``): the prompt's chunk hashes with their token counts, and
the chained hashes of its leading full text blocks. The ranker scores replicas by
the chunk tokens they hold, at any position (each replica's ``record_routing_stats``,
plus where this router sent each chunk since), chunks in the object-store tier at a
discount, and the leading text blocks this router sent them; an overloaded replica
loses its affinity to load. This module hands the ranker each candidate's stats and
queue length (Serve's cache, probing what the ranker asks for), and returns its
ranking as Serve's tiers.
Imports only Ray, the standard library and the torch-free ``mepic_ray.routing``:
never torch or the engine.
"""
from __future__ import annotations

import logging
import time
from dataclasses import fields
from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from mepic_ray.routing import RoutingInfo, routing_of
from router.probing import rank_probing
from router.ranker_config import RankerConfig
from router.ranking import ChunkAffinityRanker

log = logging.getLogger("ray.serve")
_OPTIONS = {f.name for f in fields(RankerConfig)}


class ChunkAffinityRouter(RequestRouter):
    def initialize_state(self, imbalanced_abs_threshold: int = 4, imbalanced_rel_threshold: float = 1.5,
                         min_match_tokens: int = 1, remembered_chunks: int = 4096,
                         store_weight: float = 0.25, **options: Any) -> None:
        """Keyword arguments are ``RankerConfig``'s (``request_router_kwargs`` in the YAML);
        unknown ones are logged and ignored, as before."""
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            log.warning("chunk router: ignoring unknown options %s", unknown)
        self.ranker = ChunkAffinityRanker(RankerConfig(
            imbalanced_abs_threshold=imbalanced_abs_threshold, imbalanced_rel_threshold=imbalanced_rel_threshold,
            min_match_tokens=min_match_tokens, remembered_chunks=remembered_chunks, store_weight=store_weight,
            **{k: v for k, v in options.items() if k in _OPTIONS}))
        self.last_decision = "none"
        self.last_ranking = None
        try:
            from ray.util import metrics
            self._decisions = metrics.Counter("mepic_router_decisions", "routing decisions by kind",
                                              tag_keys=("decision",))
            self._decision_s = metrics.Histogram(
                "mepic_router_decision_seconds", "time to choose a replica, waits for queue probes excluded",
                boundaries=[5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2])
            self._probes = metrics.Counter("mepic_router_probes", "queue-length probes sent to replicas")
        except Exception:   # metrics are a nicety; routing must not depend on them
            self._decisions = self._decision_s = self._probes = None

    def _record(self, decision: str, seconds: float | None = None, probes: int = 0) -> None:
        self.last_decision = decision
        if self._decisions is not None:
            self._decisions.inc(tags={"decision": decision})
            if seconds is not None:
                self._decision_s.observe(seconds)
            if probes:
                self._probes.inc(probes)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        """Serve hands over new replica objects whenever a replica's info changes, routing
        stats included: the ranker takes new reports here, off the request path."""
        super().update_replicas(replicas)
        try:
            self.ranker.observe_all((r.replica_id, r.routing_stats) for r in replicas)
        except Exception:
            log.exception("chunk router: reading routing stats failed")

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        # An exception here would leave the request hanging inside Ray: never raise.
        try:
            return await self._choose(candidate_replicas, pending_request)
        except Exception:
            log.exception("chunk router failed; falling back to all candidates")
            self._record("error")
            return [candidate_replicas]

    async def _choose(self, candidates: List[RunningReplica], pending: Optional[PendingRequest]):
        started, waited = time.perf_counter(), 0.0
        info = routing_of(pending)
        by_id = {r.replica_id: r for r in candidates}
        # Nothing new in the usual case (``update_replicas`` saw these reports first).
        self.ranker.observe_all((r.replica_id, r.routing_stats) for r in candidates)
        # Serve's queue-length cache follows this router's own sends and completions;
        # the ranker probes what it lacks and the replicas it would pick, not all of them.
        cached = {rid: self._replica_queue_len_cache.get(rid) for rid in by_id}

        async def probe(ids: list) -> dict:
            nonlocal waited
            t0 = time.perf_counter()
            try:
                return {r.replica_id: q for r, q in await self._probe_queue_lens([by_id[i] for i in ids], 0)}
            finally:
                waited += time.perf_counter() - t0
        ranking, probes = await rank_probing(self.ranker, info, list(by_id), cached, probe)
        self.last_ranking = ranking
        best = by_id[ranking.top(1)[0]]
        tiers = self._send(best, [r for r in candidates if r is not best], info)
        self._record(ranking.decision, time.perf_counter() - started - waited, probes)
        return tiers

    def _send(self, best: RunningReplica, others: List[RunningReplica],
              info: RoutingInfo) -> List[List[RunningReplica]]:
        """The first tier is one replica, so the router knows where the request goes and
        can remember its chunks there at once (Serve calls ``on_request_routed`` only in
        strict max-ongoing-requests mode). Serve takes the shortest queue of the second
        tier, should the first refuse, so it is left unsorted (``last_ranking.order`` is
        the ranker's full order)."""
        try:
            self.ranker.record_sent(best.replica_id, info)
        except Exception:
            log.exception("chunk router bookkeeping failed")
        return [[best], others] if others else [[best]]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.ranker.forget(replica_id)
