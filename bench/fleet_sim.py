"""Trace-driven fleet simulator: routing policies side by side over simulated engine
replicas (the engine's real KV cache manager, no model; ``bench/fleet_replica.py``),
with this project's real ranking code (``router/ranking.py``) and no Ray.

    python -m bench.fleet_sim --replicas 8,32,128,256 --workloads zipf,churn,burst --out bench/results/fleet

Per fleet size, policy and workload: chunk hit rate (found in the serving replica's pool
at admission) against the oracle's, chunk KV copies, max/mean requests served and
time-averaged ongoing requests, simulated TTFT p50/p99, decision CPU time per request,
and the hit rate per window of requests."""
from __future__ import annotations

import argparse
import gc
import heapq
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from bench.common import split_configs
from bench.fleet_policies import make_policy
from bench.fleet_replica import CALIBRATION, ServiceTimes, SimReplica
from bench.fleet_summary import summarize
from bench.fleet_workloads import Corpus, TraceRequest, WorkloadConfig, make_trace

ARRIVE, PREFILLED, FINISH, REPORT = range(4)


@dataclass(frozen=True)
class SimConfig:
    replicas: int
    pool_blocks: int = 4096
    # Serve refreshes routing stats this often (``request_routing_stats_period_s``).
    stats_period_s: float = 1.0
    window: int = 1000                  # requests per hit-rate window
    time_budget_s: float = 900.0        # wall clock per run: a run past it stops and says so
    keep_snapshots: bool = False        # record each admission's resident set (tests recount from it)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.pool_blocks < 64 or self.window < 1:
            raise ValueError("replicas >= 1, pool_blocks >= 64 and window >= 1 required")
        if self.stats_period_s <= 0 or self.time_budget_s <= 0:
            raise ValueError("stats_period_s and time_budget_s must be > 0")


@dataclass
class RequestRecord:
    replica: int
    index: int
    admitted: int = -1                   # admission order across the fleet
    hits: int = 0
    chunks: int = 0
    ttft_s: float | None = None
    decision_s: float = 0.0
    resident_before: frozenset = frozenset()
    # Of the chunks missing from the pool at admission: never admitted anywhere before
    # (no policy could have found them), and resident in another replica's pool then.
    cold: int = 0
    elsewhere: int = 0


@dataclass
class RunResult:
    policy: str
    records: list[RequestRecord]
    served: list[int]
    load_area: list[float]
    duration_s: float
    copies_samples: list[tuple[int, int, int]] = field(default_factory=list)   # (copies, distinct, blocks)
    router_memory: list[int] = field(default_factory=list)
    decisions: dict = field(default_factory=dict)
    truncated: bool = False
    wall_s: float = 0.0
    probes: int | None = None           # queue-length probes the router sent, all decisions


def expected_prefill_s(trace: list[TraceRequest], times: ServiceTimes, hit_rate: float) -> float:
    """Mean prefill time when each chunk is found with probability ``hit_rate``: the
    leading text is cached, each chunk's first block and the question are computed in
    context, a missed chunk is compiled on its own."""
    total = 0.0
    for r in trace:
        pos, in_ctx, pairs, compile_s = 64, 0, 0, 0.0
        for n in r.chunk_tokens:
            pad = -n % 16
            pos += pad + n
            first = 16 - pad
            in_ctx += first
            pairs += first * (pos - n + first)
            compile_s += times.prefill_s(n, n * (n + 1) // 2) - times.a_s
        q = 26
        total += times.prefill_s(in_ctx + q, pairs + q * (pos + q)) + (1 - hit_rate) * compile_s
    return total / len(trace)


def simulate(policy, trace: list[TraceRequest], corpus: Corpus, cfg: SimConfig, times: ServiceTimes,
             progress: bool = True) -> RunResult:
    fleet = [SimReplica(i, cfg.pool_blocks, corpus, times, cfg.keep_snapshots) for i in range(cfg.replicas)]
    events: list = []
    seq = 0

    def push(t: float, kind: int, payload) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))
    for r in fleet:
        r.report()
        push(cfg.stats_period_s * (r.rid + 0.5) / cfg.replicas, REPORT, r.rid)   # phases spread over a period
    for req in trace:
        push(req.arrival_s, ARRIVE, req)
    records: list[RequestRecord | None] = [None] * len(trace)
    result = RunResult(getattr(policy, "name", type(policy).__name__), [], [], [], 0.0)
    on_prefill = getattr(policy, "on_prefill_done", None)
    on_finish = getattr(policy, "on_finish", None)
    on_report = getattr(policy, "on_report", None)
    started, arrived, finished, admitted = time.perf_counter(), 0, 0, 0
    bar = tqdm(total=len(trace), desc=f"{result.policy} x{cfg.replicas}", leave=False, disable=not progress,
               mininterval=2)
    now = 0.0

    seen: set[str] = set()     # chunks admitted anywhere so far

    def start(r: SimReplica) -> None:
        nonlocal admitted
        head = r.queue[0][0] if r.prefilling is None and r.queue else None
        missing = [h for h in head.routing.chunk_hashes if h not in r.kv.chunks.entries] if head else []
        a = r.try_start(now)
        if a is not None:
            rec = records[a.trace.index]
            rec.admitted, admitted = admitted, admitted + 1
            rec.hits, rec.chunks, rec.resident_before = a.hits, a.hits + a.misses, a.resident_before
            rec.cold = sum(h not in seen for h in missing)
            rec.elsewhere = sum(h in seen and any(h in o.kv.chunks.entries for o in fleet if o is not r)
                                for h in missing)
            seen.update(a.trace.routing.chunk_hashes)
            push(now + a.prefill_s, PREFILLED, r.rid)
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == ARRIVE:
            # The router's CPU time, not the wall clock (other processes share the machine);
            # no collector in the timed call: its garbage is the simulator's, not the router's.
            gc.disable()
            t0 = time.thread_time()
            rid = policy.choose(payload, fleet, now)
            took = time.thread_time() - t0
            gc.enable()
            records[payload.index] = RequestRecord(rid, payload.index, decision_s=took)
            fleet[rid].arrive(now, payload)
            start(fleet[rid])
            arrived += 1
            if arrived % cfg.window == 0:
                ids = [set(r.kv.chunks.entries) for r in fleet]
                result.copies_samples.append((sum(map(len, ids)), len(set().union(*ids)),
                                              sum(r.used_chunk_blocks() for r in fleet)))
                if hasattr(policy, "memory"):
                    result.router_memory.append(policy.memory())
                if time.perf_counter() - started > cfg.time_budget_s:
                    result.truncated = True
                    break
        elif kind == PREFILLED:
            r = fleet[payload]
            a, done_at = r.prefill_done(now)
            records[a.trace.index].ttft_s = now - a.trace.arrival_s
            if on_prefill is not None:
                on_prefill(r.rid, a.trace)
            push(done_at, FINISH, (payload, a))
            start(r)
        elif kind == FINISH:
            r = fleet[payload[0]]
            r.finish(now, payload[1])
            if on_finish is not None:
                on_finish(r.rid, payload[1].trace, now)
            finished += 1
            bar.update(1)
            start(r)
        elif kind == REPORT:
            stats = fleet[payload].report()
            if on_report is not None:
                on_report(payload, stats)
            if arrived < len(trace) or finished < arrived:
                push(now + cfg.stats_period_s, REPORT, payload)
    bar.close()
    for r in fleet:
        r._touch(now)
    result.records = [x for x in records if x is not None and x.ttft_s is not None]
    result.served = [r.served for r in fleet]
    result.load_area = [r.load_area for r in fleet]
    result.duration_s = now
    result.decisions = dict(getattr(policy, "decisions", {}))
    result.probes = getattr(policy, "probes", None)
    result.wall_s = time.perf_counter() - started
    return result


def split_policies(text: str) -> list[str]:
    """``a,b,chunk_affinity:x=1,y=2;c``: ';' always separates, ',' only between names."""
    return [name for part in text.split(";") for name in split_configs(part) if name]


def requests_for(replicas: int, minimum: int, per_replica: int) -> int:
    return max(minimum, per_replica * replicas)


def workload_for(kind: str, replicas: int, args, times: ServiceTimes) -> tuple[WorkloadConfig, list, Corpus]:
    """The workload grows with the fleet: tenants per replica and requests per replica
    fixed, the arrival rate set for ``--utilization`` of the fleet's prefill time at
    ``--reference-hit-rate``."""
    wl = WorkloadConfig(kind=kind, requests=requests_for(replicas, args.min_requests, args.requests_per_replica),
                        tenants=max(1, round(args.tenants_per_replica * replicas)),
                        docs_per_tenant=args.docs_per_tenant, seed=args.seed)
    corpus = Corpus(wl)
    probe = make_trace(replace(wl, requests=300), corpus)
    rate = args.utilization * replicas / expected_prefill_s(probe, times, args.reference_hit_rate)
    wl = replace(wl, rate_per_s=rate)
    return wl, make_trace(wl, corpus), corpus


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", default="8,32,128,256")
    ap.add_argument("--workloads", default="zipf,churn,burst")
    ap.add_argument("--policies", default="round_robin,power_of_two,prefix_tree,dynamo,chunk_affinity_legacy,"
                                          "chunk_affinity,oracle_bounded,oracle",
                    help="names separated by ';' or ','; chunk_affinity:key=value,... sets RankerConfig fields")
    ap.add_argument("--min-requests", type=int, default=10_000)
    ap.add_argument("--requests-per-replica", type=int, default=160)
    ap.add_argument("--tenants-per-replica", type=float, default=1.0)
    ap.add_argument("--docs-per-tenant", type=int, default=200)
    ap.add_argument("--pool-blocks", type=int, default=4096)
    ap.add_argument("--utilization", type=float, default=0.7)
    ap.add_argument("--reference-hit-rate", type=float, default=0.8)
    ap.add_argument("--ingresses", type=int, default=1)
    ap.add_argument("--stats-period-s", type=float, default=1.0)
    ap.add_argument("--time-budget-s", type=float, default=900.0)
    ap.add_argument("--calibration", default=CALIBRATION)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/fleet")
    args = ap.parse_args(argv)
    times = ServiceTimes.from_file(args.calibration)
    results: dict = {"command": "python -m bench.fleet_sim " + shlex.join(sys.argv[1:] if argv is None else argv),
                     "args": vars(args), "service_times": asdict(times), "runs": []}
    for kind in args.workloads.split(","):
        for n in (int(x) for x in args.replicas.split(",")):
            wl, trace, corpus = workload_for(kind, n, args, times)
            cfg = SimConfig(n, args.pool_blocks, args.stats_period_s, time_budget_s=args.time_budget_s)
            for name in split_policies(args.policies):
                res = simulate(make_policy(name, n, args.seed, args.ingresses), trace, corpus, cfg, times)
                row = {"workload": kind, "replicas": n, "rate_per_s": wl.rate_per_s, "tenants": wl.tenants,
                       **summarize(res, cfg.window)}
                results["runs"].append(row)
                print(f"{kind:6s} x{n:<4d} {name:22s} hit {row['hit_rate']:.3f} copies {row['copies_per_chunk']:.2f} "
                      f"served {row['max_over_mean_served']:.2f} load {row['max_over_mean_load']:.2f} "
                      f"ttft {row['ttft_p50_s']:.2f}/{row['ttft_p99_s']:.2f} s "
                      f"dec {row['decision_p50_ms']:.3f}/{row['decision_p99_ms']:.3f} ms "
                      f"slope {row['steady_slope_per_10k']:+.3f} probes {row['probes_per_request']} mem "
                      f"{row['router_memory'][-1:] } {row['decisions']} wall {row['wall_s']:.0f}s",
                      flush=True)
    if args.out:
        from bench.fleet_report import write_report
        write_report(results, Path(args.out))
    return results


if __name__ == "__main__":
    main()
