"""Chunk-affinity request router for Ray Serve.

The ingress hashes each prompt's chunks (``mepic_ray.hashing``) and passes
``routing={"chunks": [[hash, tokens], ...]}`` in the request payload. Replicas
are ranked by how many of those chunk tokens they already hold, at any position:
exactly (each replica's ``record_routing_stats``) or approximately (where this
router sent each chunk since). When queues are imbalanced (SGLang's rule:
max - min > abs threshold and max > rel factor * min) load wins.
Imports only Ray and the standard library: never torch or the engine.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

log = logging.getLogger("ray.serve")


def request_chunks(pending: Optional[PendingRequest]) -> list[tuple[str, int]]:
    if pending is None or not pending.args:
        return []
    payload = pending.args[0]
    if not isinstance(payload, dict):
        return []
    return [(str(h), int(n)) for h, n in (payload.get("routing") or {}).get("chunks", [])]


class ChunkAffinityRouter(RequestRouter):
    def initialize_state(self, imbalanced_abs_threshold: int = 4, imbalanced_rel_threshold: float = 1.5,
                         min_match_tokens: int = 1, remembered_chunks: int = 4096, **_: Any) -> None:
        self._abs = imbalanced_abs_threshold
        self._rel = imbalanced_rel_threshold
        self._min_match = min_match_tokens
        self._remember = remembered_chunks
        self._sent: dict[ReplicaID, OrderedDict[str, None]] = {}
        self.last_decision = "none"
        try:
            from ray.util import metrics
            self._decisions = metrics.Counter("mepic_router_decisions", "routing decisions by kind",
                                              tag_keys=("decision",))
        except Exception:   # metrics are a nicety; routing must not depend on them
            self._decisions = None

    def _record(self, decision: str) -> None:
        self.last_decision = decision
        if self._decisions is not None:
            self._decisions.inc(tags={"decision": decision})

    async def _queue_lens(self, replicas: List[RunningReplica]) -> dict[ReplicaID, int]:
        # Probe rather than trust the cached lengths: the cache is refreshed only when
        # a request is sent, so a replica busy with long streams can look idle in it.
        lens = {}
        for r, q in await self._probe_queue_lens(replicas, 0):
            if q is not None:
                lens[r.replica_id] = q
        for r in replicas:
            if r.replica_id not in lens and (q := self._replica_queue_len_cache.get(r.replica_id)) is not None:
                lens[r.replica_id] = q
        return lens

    def _held(self, r: RunningReplica) -> set[str]:
        stats = r.routing_stats or {}
        return set(stats.get("chunks", ())) | set(self._sent.get(r.replica_id, ()))

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
        chunks = request_chunks(pending)
        lens = await self._queue_lens(candidates)
        load = {r.replica_id: lens.get(r.replica_id, 0) for r in candidates}
        free = {r.replica_id: (r.routing_stats or {}).get("free_blocks", 0) for r in candidates}
        by_load = sorted(candidates, key=lambda r: (load[r.replica_id], -free[r.replica_id]))
        hi, lo = max(load.values(), default=0), min(load.values(), default=0)
        if hi - lo > self._abs and hi > self._rel * lo:
            self._record("load_fallback")
            return [[by_load[0]], by_load[1:]] if len(by_load) > 1 else [by_load]
        score = {r.replica_id: 0 for r in candidates}
        for r in candidates:
            held = self._held(r)
            score[r.replica_id] = sum(n for h, n in chunks if h in held)
        best = max(score.values(), default=0)
        if not chunks or best < self._min_match:
            self._record("no_match")
            # Spread unrelated traffic: least loaded, then the replica holding the least.
            resident = {r.replica_id: len(self._held(r)) for r in candidates}
            order = sorted(candidates, key=lambda r: (load[r.replica_id], resident[r.replica_id]))
            return [[order[0]], order[1:]] if len(order) > 1 else [order]
        self._record("affinity")
        top = [r for r in by_load if score[r.replica_id] == best]
        rest = sorted((r for r in by_load if score[r.replica_id] < best), key=lambda r: -score[r.replica_id])
        return [top, rest] if rest else [top]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        try:
            sent = self._sent.setdefault(replica_id, OrderedDict())
            for h, _ in request_chunks(pending_request):
                sent[h] = None
                sent.move_to_end(h)
            while len(sent) > self._remember:
                sent.popitem(last=False)
        except Exception:
            log.exception("chunk router bookkeeping failed")

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent.pop(replica_id, None)
