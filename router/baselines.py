"""Baseline routers for the routing benchmark (Ray's default power-of-two-choices
router needs no code: leave ``request_router_config`` out)."""
from __future__ import annotations

from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class RoundRobinRouter(RequestRouter):
    """Replicas in turn, whatever the request holds: the cache-blind baseline."""

    def initialize_state(self, **_: Any) -> None:
        self._next = 0

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return [ordered]
        i = self._next % len(ordered)
        self._next += 1
        return [ordered[i:i + 1], ordered[i + 1:] + ordered[:i]]
