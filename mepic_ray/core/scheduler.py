"""Continuous batching with chunked prefill and preemption.

Every step: each running decode takes its one token (a page when it crosses a block
boundary, preempting the most recently admitted request when the pool is dry);
running prefills continue, oldest first; then waiting requests are admitted, first
come first served, while the token budget, ``max_num_seqs`` and the pool allow.
``max_num_batched_tokens`` counts every token the step computes: decodes, chunk
compiles, prompt slots and recomputed chunk slots, and selection probes scaled by
their depth. A prefill's work (compiles it waits for, a probe, slots in context) is
split across steps at token granularity to fit the budget.
"""
from __future__ import annotations

import math
from collections import deque

from mepic_ray.core.chunk_coordinator import ChunkHashCollisionError
from mepic_ray.core.kv_manager import KVCacheManager
from mepic_ray.core.request import Request, Status
from mepic_ray.core.work import CompilePiece, ScheduledSeq, SchedulerOutput


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 probe_depth: float = 0.0):
        self.kv, self.max_num_seqs, self.max_num_batched_tokens = kv, max_num_seqs, max_num_batched_tokens
        self.probe_depth = probe_depth   # check layer / layers: a probe row's cost in tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []     # in admission order: preemption takes from the end
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._decodes(out)
        budget = self.max_num_batched_tokens - len(out.decodes)
        step_jobs: set[int] = set()
        for req in self.running:
            if budget <= 0:
                break
            if not self.kv.requests[req.request_id].prefilled:
                budget -= self._take_prefill(req, budget, out, step_jobs)
        # After a preemption nothing is admitted this step (as in vLLM): the pages just
        # given back are for the running requests, not for a thrash.
        while self.waiting and not out.preempted and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            try:
                # An empty engine admits without the watermark: a request that fits the pool always runs.
                plan = self.kv.plan(req, self.kv.watermark if self.running else 0)
            except ChunkHashCollisionError as e:
                # Fail this request alone; mixing another chunk's KV would be silently wrong.
                self.waiting.popleft()
                req.status = Status.FINISHED
                out.failed.append((req, str(e)))
                continue
            if plan is None:
                break    # head of line waits for blocks; later requests must not overtake it
            self.waiting.popleft()
            self.kv.commit(req, plan, out)
            req.status = Status.RUNNING
            self.running.append(req)
            budget -= self._take_prefill(req, budget, out, step_jobs)
        out.num_tokens = self.max_num_batched_tokens - budget
        out.demotions = self.kv.take_demotions()
        out.dropped_copies = self.kv.copies.take_dropped()
        return out

    def _decodes(self, out: SchedulerOutput) -> None:
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if not self.kv.requests[req.request_id].prefilled:
                i += 1
                continue
            while not self.kv.grow(req):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                out.decodes.append(ScheduledSeq(req, self.kv.block_table(req), [req.num_slots - 1]))
                i += 1

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.preempt(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)
        self.num_preemptions += 1

    def _take_prefill(self, req: Request, budget: int, out: SchedulerOutput, step_jobs: set[int]) -> int:
        """Schedule the next part of a request's prefill within ``budget`` tokens, in its
        work's order; returns the tokens used. A probe reads what the compiles wrote, so
        it runs in a step after theirs; a private copy is overwritten in context only
        after its compile's step. Shared chunk pages are read in the same forward that
        finishes them: each layer writes every row's K/V before any row attends."""
        kv = self.kv.requests[req.request_id]
        used = 0
        for job in kv.compiles:
            n = min(budget - used, job.remaining)
            if n > 0:
                start = job.slots.start + job.scheduled
                job.scheduled += n
                out.compiles.append(CompilePiece(job, list(range(start, start + n))))
                step_jobs.add(id(job))
                used += n
            if job.remaining:
                return used
        waits_for_step = any(id(job) in step_jobs for job in kv.compiles)
        if waits_for_step and (kv.probe is not None or not self.kv.policy.shares_chunks):
            return used
        kv.compiles = []
        seq = None
        if kv.probe is not None:
            probe = self.kv.take_probe(req)
            used += math.ceil(self.probe_depth * (len(probe.query_slots) + len(probe.candidates)))
            out.probes.append(probe)
            if used < budget:   # the piece's slots are known once the probe has picked
                n = min(budget - used, probe.max_todo)
                seq = probe.seq = ScheduledSeq(req, kv.block_table, [], num_tokens=n)
                used += n
        elif kv.todo and used < budget:
            n = min(budget - used, len(kv.todo))
            seq = ScheduledSeq(req, kv.block_table, kv.todo[:n], samples=n == len(kv.todo))
            kv.prefilled = seq.samples
            del kv.todo[:n]
            used += n
        if seq is not None:
            out.prefills.append(seq)
        req.stats.prefill_steps += used > 0
        return used

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
