"""Where the simulator's misses come from, against a recount from the trace and the
admission order alone: a chunk is cold when no earlier admission anywhere brought it, and
with pools that never evict every other miss is a chunk another replica holds. Then the
frontier benchmark end to end on a small fleet."""
import json
from collections import defaultdict

import pytest

from bench import fleet_frontier
from bench.fleet_policies import make_policy
from bench.fleet_replica import ServiceTimes
from bench.fleet_sim import SimConfig, simulate
from bench.fleet_summary import summarize
from bench.fleet_workloads import Corpus, WorkloadConfig, make_trace

TIMES = ServiceTimes(a_s=0.05, b_s_per_token=0.002, c2_s_per_pair=2e-6, d0_s=0.04, d1_s_per_seq=0.02)


def run(policy: str, kind: str, replicas: int, pool_blocks: int, requests: int = 400):
    wl = WorkloadConfig(kind=kind, requests=requests, tenants=4, docs_per_tenant=40, rate_per_s=6.0, seed=2,
                        churn_every=5, burst_every=200, burst_len=50)
    corpus = Corpus(wl)
    trace = make_trace(wl, corpus)
    res = simulate(make_policy(policy, replicas), trace, corpus, SimConfig(replicas, pool_blocks, window=100),
                   TIMES, progress=False)
    return {t.index: t for t in trace}, res


def recount_cold(by_index: dict, records) -> dict[int, int]:
    seen, cold = set(), {}
    for rec in sorted(records, key=lambda r: r.admitted):
        chunks = set(by_index[rec.index].routing.chunk_hashes)
        cold[rec.index] = len(chunks - seen)
        seen |= chunks
    return cold


@pytest.mark.parametrize("policy", ["chunk_affinity", "round_robin", "oracle"])
def test_misses_split_as_a_recount_when_nothing_is_evicted(policy):
    by_index, res = run(policy, "churn", replicas=5, pool_blocks=40_000)
    cold = recount_cold(by_index, res.records)
    held = defaultdict(set)
    for rec in sorted(res.records, key=lambda r: r.admitted):
        chunks = set(by_index[rec.index].routing.chunk_hashes)
        missing = chunks - held[rec.replica]
        assert rec.chunks - rec.hits == len(missing)
        assert rec.cold == cold[rec.index]
        assert rec.elsewhere == len(missing) - cold[rec.index]   # held by whichever replica brought it
        held[rec.replica] |= chunks
    s = summarize(res, 100)
    assert s["miss_gone"] == 0
    assert s["hit_rate"] + s["miss_cold"] + s["miss_elsewhere"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["zipf", "burst"])
def test_misses_split_when_pools_evict(kind):
    by_index, res = run("chunk_affinity", kind, replicas=4, pool_blocks=300)
    cold = recount_cold(by_index, res.records)
    assert all(rec.cold == cold[rec.index] for rec in res.records)
    assert all(0 <= rec.cold + rec.elsewhere <= rec.chunks - rec.hits for rec in res.records)
    s = summarize(res, 100)
    assert s["miss_gone"] > 0                     # small pools: some chunks are evicted everywhere
    assert s["hit_rate"] + s["miss_cold"] + s["miss_elsewhere"] + s["miss_gone"] == pytest.approx(1.0)


def test_frontier_report_on_a_small_fleet(tmp_path):
    out = tmp_path / "frontier"
    policies = ["chunk_affinity", "chunk_affinity:imbalanced_abs_threshold=12",
                f"chunk_affinity:{fleet_frontier.UNCAPPED},max_load_ratio=1.5", "oracle_bounded", "oracle"]
    results = fleet_frontier.main(["--replicas", "4", "--workloads", "churn", "--min-requests", "300",
                                   "--requests-per-replica", "10", "--policies", ";".join(policies),
                                   "--out", str(out)])
    assert [r["policy"] for r in results["runs"]] == policies
    assert json.loads(out.with_suffix(".json").read_text())["runs"] == results["runs"]
    md = out.with_suffix(".md").read_text()
    for name in ("defaults (abs 4)", "| abs 12 |", "| cap 1.5 |", "| oracle_bounded |", "| oracle |"):
        assert name in md
    assert out.with_suffix(".png").stat().st_size > 10_000
    oracle = next(r for r in results["runs"] if r["policy"] == "oracle")
    assert all(r["miss_cold"] == pytest.approx(oracle["miss_cold"]) for r in results["runs"])   # one trace
