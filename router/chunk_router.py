"""Chunk-affinity request router for Ray Serve.

The ingress puts a ``mepic_ray.routing.RoutingInfo`` in each request payload
(``payload["routing"]``): the prompt's chunk hashes with their token counts, and
the chained hashes of its leading full text blocks. Replicas are ranked by how many
of those chunk tokens they already hold, at any position: exactly (each replica's
``record_routing_stats``) or approximately (where this router sent each chunk
since); chunks in the object-store tier count at a discount, and the prompt's
leading text blocks add the prefix a replica has already seen (where this router
sent those prefixes). When queues are imbalanced (SGLang's rule: max - min > abs
threshold and max > rel factor * min) load wins.
Imports only Ray, the standard library and the torch-free ``mepic_ray.routing``:
never torch or the engine.
"""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from mepic_ray.routing import RoutingInfo, routing_of

log = logging.getLogger("ray.serve")


class ChunkAffinityRouter(RequestRouter):
    def initialize_state(self, imbalanced_abs_threshold: int = 4, imbalanced_rel_threshold: float = 1.5,
                         min_match_tokens: int = 1, remembered_chunks: int = 4096,
                         store_weight: float = 0.25, **_: Any) -> None:
        self._abs = imbalanced_abs_threshold
        self._rel = imbalanced_rel_threshold
        self._min_match = min_match_tokens
        self._remember = remembered_chunks
        # A chunk in the object store near a replica saves its compile but costs a load:
        # worth a fraction of one resident in the replica's pool.
        self._store_weight = store_weight
        self._sent: dict[ReplicaID, OrderedDict[str, None]] = {}
        self._sent_prefix: dict[ReplicaID, OrderedDict[str, None]] = {}   # SGLang-style approximate prefix tree
        self._routed: Counter[ReplicaID] = Counter()
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

    def _prefix_tokens(self, r: RunningReplica, info: RoutingInfo) -> int:
        sent = self._sent_prefix.get(r.replica_id, {})
        n = 0
        while n < len(info.prefix) and info.prefix[n] in sent:   # chained hashes: a hit implies the whole prefix
            n += 1
        return n * info.block_size

    async def _choose(self, candidates: List[RunningReplica], pending: Optional[PendingRequest]):
        info = routing_of(pending)
        lens = await self._queue_lens(candidates)
        load = {r.replica_id: lens.get(r.replica_id, 0) for r in candidates}
        free = {r.replica_id: (r.routing_stats or {}).get("free_blocks", 0) for r in candidates}
        by_load = sorted(candidates, key=lambda r: (load[r.replica_id], -free[r.replica_id]))
        hi, lo = max(load.values(), default=0), min(load.values(), default=0)
        if hi - lo > self._abs and hi > self._rel * lo:
            self._record("load_fallback")
            return self._send(by_load, info)
        score = {r.replica_id: 0.0 for r in candidates}
        for r in candidates:
            held = self._held(r)
            stored = set((r.routing_stats or {}).get("stored", ()))
            # Tokens this replica would not compute: chunk tokens it holds (store ones at a
            # discount), plus the prompt prefix it has seen; both are reused KV.
            score[r.replica_id] = sum(n if h in held else self._store_weight * n if h in stored else 0
                                      for h, n in info.chunks) + self._prefix_tokens(r, info)
        best = max(score.values(), default=0)
        if best < self._min_match:
            self._record("no_match")
            # Spread unrelated traffic: least loaded, then the replica this router sent the
            # fewest requests (resident chunk counts would mislead: a replica warmed from
            # the store holds many idle, evictable chunks).
            return self._send(sorted(candidates, key=lambda r: (load[r.replica_id], self._routed[r.replica_id])),
                              info)
        self._record("affinity")
        return self._send(sorted(by_load, key=lambda r: -score[r.replica_id]), info)

    def _send(self, ranked: List[RunningReplica], info: RoutingInfo) -> List[List[RunningReplica]]:
        """The first tier is one replica, so the router knows where the request goes and
        can remember its chunks there at once (Serve calls ``on_request_routed`` only in
        strict max-ongoing-requests mode)."""
        try:
            rid = ranked[0].replica_id
            self._routed[rid] += 1
            for table, hashes in ((self._sent, info.chunk_hashes), (self._sent_prefix, info.prefix)):
                sent = table.setdefault(rid, OrderedDict())
                for h in hashes:
                    sent[h] = None
                    sent.move_to_end(h)
                while len(sent) > self._remember:
                    sent.popitem(last=False)
        except Exception:
            log.exception("chunk router bookkeeping failed")
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent.pop(replica_id, None)
        self._sent_prefix.pop(replica_id, None)
        self._routed.pop(replica_id, None)
