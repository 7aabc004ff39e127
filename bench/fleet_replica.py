"""One simulated engine replica: the engine's real KV cache manager (block pool, chunk
coordinator, prefix cache, admission) built without a model, and service times from
the calibration file (``bench/fleet_calibrate.py``).

A replica prefills one request at a time (FIFO, head of line waits until the pool
has room, as the engine's admission does) and decodes any number at once: a request
holds its pages from admission until its last token. Prefill time is
``a + b * tokens computed + c2 * attention pairs`` (``c2`` is twice the fitted square
term: a prompt of n tokens has about n²/2 pairs); a compiled chunk attends only to
itself, a token computed in context to every slot before it. A decode step of B
sequences takes ``d0 + d1 * B``; decoding does not slow prefills down here.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from mepic_ray.core.kv_manager import KVCacheManager
from mepic_ray.core.layout import build_layout
from mepic_ray.core.policy import make_policy
from mepic_ray.core.request import Request
from mepic_ray.core.work import SchedulerOutput
from mepic_ray.sampling_params import SamplingParams

from bench.fleet_workloads import BLOCK_SIZE, Corpus, TraceRequest, fingerprint_of, segments_of

CALIBRATION = "bench/results/fleet_calibration.json"


@dataclass(frozen=True)
class ServiceTimes:
    a_s: float
    b_s_per_token: float
    c2_s_per_pair: float
    d0_s: float
    d1_s_per_seq: float

    def __post_init__(self) -> None:
        if min(self.a_s, self.b_s_per_token, self.c2_s_per_pair, self.d0_s, self.d1_s_per_seq) < 0:
            raise ValueError("service time coefficients must be >= 0")

    @classmethod
    def from_file(cls, path: str | Path = CALIBRATION) -> "ServiceTimes":
        cal = json.loads(Path(path).read_text())
        p, d = cal["prefill"], cal["decode"]
        return cls(p["a_s"], p["b_s_per_token"], 2 * p["c_s_per_token2"], d["d0_s"], d["d1_s_per_seq"])

    def prefill_s(self, tokens: int, pairs: int) -> float:
        return self.a_s + self.b_s_per_token * tokens + self.c2_s_per_pair * pairs

    def decode_step_s(self, seqs: int) -> float:
        return self.d0_s + self.d1_s_per_seq * seqs


@dataclass
class Admitted:
    trace: TraceRequest
    request: Request
    hits: int          # distinct chunks found in the pool (the engine's chunks_pool)
    misses: int        # distinct chunks compiled here (chunks_miss)
    prefill_s: float
    resident_before: frozenset


_PARAMS = SamplingParams(max_tokens=32, temperature=0)


class SimReplica:
    def __init__(self, rid: int, num_blocks: int, corpus: Corpus, times: ServiceTimes, keep_snapshots: bool = False):
        self.rid = rid
        self.kv = KVCacheManager(make_policy("mepic"), BLOCK_SIZE, num_blocks, bytes_per_block=1)
        self.corpus, self.times = corpus, times
        self.queue: deque[tuple[TraceRequest, Request | None]] = deque()
        self.prefilling: Admitted | None = None
        self.decoding: dict[str, Admitted] = {}
        self.pending_chunks: dict[str, int] = {}    # chunks of queued requests (what an oracle may know)
        self.served = 0
        self.load_area = 0.0                       # integral of ongoing requests over time
        self._last_change = 0.0
        self.stats: dict | None = None             # the last routing report
        self._keep_snapshots = keep_snapshots      # tests recount hits from them

    @property
    def load(self) -> int:
        """Ongoing requests: what Serve's queue-length probe returns."""
        return len(self.queue) + (self.prefilling is not None) + len(self.decoding)

    def _touch(self, now: float) -> None:
        self.load_area += self.load * (now - self._last_change)
        self._last_change = now

    def report(self) -> dict:
        """What ``record_routing_stats`` returns (a new object every time, as over Ray)."""
        c = self.kv.chunks
        self.stats = {"chunks": list(c.entries), "stored": [], "free_blocks": self.kv.pool.num_free + c.idle_blocks,
                      "running": len(self.decoding), "waiting": len(self.queue)}
        return self.stats

    def used_chunk_blocks(self) -> int:
        return sum(len(e.blocks) for e in self.kv.chunks.entries.values())

    def arrive(self, now: float, trace: TraceRequest) -> None:
        self._touch(now)
        self.queue.append((trace, None))
        for h in trace.routing.chunk_hashes:
            self.pending_chunks[h] = self.pending_chunks.get(h, 0) + 1

    def try_start(self, now: float) -> Admitted | None:
        """Admit the head of the queue if the pool covers it; returns it, prefilling."""
        if self.prefilling is not None or not self.queue:
            return None
        trace, req = self.queue[0]
        if req is None:
            lay = build_layout(segments_of(self.corpus, trace), BLOCK_SIZE, True, fingerprint_of(trace))
            req = Request(str(trace.index), None, _PARAMS, [], lay)
            self.queue[0] = (trace, req)
        kv = self.kv
        plan = kv.plan(req, kv.watermark)
        if plan is None:
            if not self.decoding:
                raise RuntimeError(f"request {trace.index} can never fit a pool of {kv.pool.num_blocks} blocks")
            return None
        self._touch(now)
        self.queue.popleft()
        for h in trace.routing.chunk_hashes:
            left = self.pending_chunks[h] - 1
            if left:
                self.pending_chunks[h] = left
            else:
                del self.pending_chunks[h]
        before = frozenset(kv.chunks.entries) if self._keep_snapshots else frozenset()
        kv.commit(req, plan, SchedulerOutput())
        st, state = req.stats, kv.requests[req.request_id]
        pairs = sum(state.todo) + len(state.todo)
        pairs += sum(c.num_tokens * (c.num_tokens + 1) // 2 for c in plan.new_chunks.values())
        dur = self.times.prefill_s(len(state.todo) + st.compiled_tokens, pairs)
        self.prefilling = Admitted(trace, req, st.chunks_pool, st.chunks_miss, dur, before)
        return self.prefilling

    def prefill_done(self, now: float) -> tuple[Admitted, float]:
        """The prefill ends: its compiles become shared pages, its prompt blocks enter the
        prefix cache. Returns it and when its last token comes."""
        a, self.prefilling = self.prefilling, None
        kv, req = self.kv, a.request
        for job in list(kv.requests[req.request_id].compiles):
            if kv.compiling.get(job.chunk_hash) is job:
                kv.finish_compile(job)
        kv.register_prefix(req, len(req.layout.token_ids))
        kv.requests[req.request_id].prefilled = True
        self.decoding[req.request_id] = a
        return a, now + a.trace.output_tokens * self.times.decode_step_s(len(self.decoding))

    def finish(self, now: float, a: Admitted) -> None:
        self._touch(now)
        del self.decoding[a.request.request_id]
        self.kv.free(a.request)
        self.served += 1
