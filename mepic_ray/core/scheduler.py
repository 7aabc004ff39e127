"""Continuous batching: running requests decode every step; waiting requests
join, first come first served, while the token budget and the KV pool allow."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mepic_ray.core.chunk_coordinator import ChunkHashCollisionError
from mepic_ray.config import EngineConfig
from mepic_ray.core.kv_manager import CompileJob, KVCacheManager
from mepic_ray.core.request import Request, Status


@dataclass
class ScheduledBatch:
    prefills: list[Request] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    compiles: list[CompileJob] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVCacheManager, host_store: dict):
        self.cfg, self.kv, self.host_store = cfg, kv, host_store
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(decodes=list(self.running))
        for r in batch.decodes:
            self.kv.append_slot(r)
        budget = self.cfg.max_num_batched_tokens - len(batch.decodes)
        pending: dict[str, CompileJob] = {}
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            try:
                plan = self.kv.plan(req)
            except ChunkHashCollisionError as e:
                # Fail this request alone; mixing another chunk's KV would be silently wrong.
                self.waiting.popleft()
                req.status = Status.FINISHED
                batch.failed.append((req, str(e)))
                continue
            if plan is None:
                break    # head of line waits for pages; later requests must not overtake it
            if batch.prefills and plan.query_tokens > budget:
                break
            self.waiting.popleft()
            batch.compiles += self.kv.commit(req, plan, self.host_store, pending)
            req.status = Status.RUNNING
            self.running.append(req)
            batch.prefills.append(req)
            budget -= plan.query_tokens
        return batch

    def finish(self, req: Request) -> None:
        req.status = Status.FINISHED
        self.running.remove(req)
        self.kv.free(req)

    def abort(self, request_id: str) -> Request | None:
        for req in list(self.waiting):
            if req.request_id == request_id:
                self.waiting.remove(req)
                req.status = Status.FINISHED
                return req
        for req in self.running:
            if req.request_id == request_id:
                self.finish(req)
                return req
        return None

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)
