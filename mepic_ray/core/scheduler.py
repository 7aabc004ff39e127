"""Continuous batching: running requests decode every step; waiting requests
join, first come first served, while the token budget and the KV pool allow."""
from __future__ import annotations

from collections import deque

from mepic_ray.core.chunk_coordinator import ChunkHashCollisionError
from mepic_ray.core.kv_manager import KVCacheManager
from mepic_ray.core.request import Request, Status
from mepic_ray.core.work import ScheduledSeq, SchedulerOutput


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv, self.max_num_seqs, self.max_num_batched_tokens = kv, max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        for r in self.running:
            self.kv.append_slot(r)
            out.decodes.append(ScheduledSeq(r, self.kv.block_table(r), [r.num_slots - 1]))
        budget = self.max_num_batched_tokens - len(out.decodes)
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            try:
                plan = self.kv.plan(req)
            except ChunkHashCollisionError as e:
                # Fail this request alone; mixing another chunk's KV would be silently wrong.
                self.waiting.popleft()
                req.status = Status.FINISHED
                out.failed.append((req, str(e)))
                continue
            if plan is None:
                break    # head of line waits for blocks; later requests must not overtake it
            if out.prefills and plan.query_tokens > budget:
                break
            self.waiting.popleft()
            out.prefills.append(self.kv.commit(req, plan, out))
            req.status = Status.RUNNING
            self.running.append(req)
            budget -= plan.query_tokens
        out.demotions = self.kv.take_demotions()
        out.dropped_copies = self.kv.copies.take_dropped()
        return out

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
