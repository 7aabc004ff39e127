"""The fleet simulator and the Ray-free ranker, against references computed here: the
ranking equals a brute-force one over every replica from a model of what the ranker was
told (reports, sends) and the documented rules; hit counts equal a recount from each
admission's resident set (and, with pools that never evict, from the trace alone); no
policy beats the compulsory-miss bound nor the oracle; routing info is the engine's."""
import hashlib
import random
import subprocess
import sys
import zlib
from collections import defaultdict

import pytest

from bench.fleet_policies import POLICIES, ChunkAffinity, make_policy
from bench.fleet_replica import ServiceTimes
from bench.fleet_sim import SimConfig, simulate
from bench.fleet_summary import summarize
from bench.fleet_workloads import BLOCK_SIZE, Corpus, WorkloadConfig, fingerprint_of, make_trace, segments_of
from mepic_ray.core.layout import build_layout
from mepic_ray.routing import RoutingInfo
from router.probing import rank_probing, run_sync
from router.ranker_config import RankerConfig
from router.ranking import ChunkAffinityRanker

TIMES = ServiceTimes(a_s=0.05, b_s_per_token=0.002, c2_s_per_pair=2e-6, d0_s=0.04, d1_s_per_seq=0.02)


class Model:
    """What one replica told the ranker, kept naively: every report and every send."""

    def __init__(self):
        self.reports = []            # stats dicts, in order
        self.sends = []              # (number of reports seen at the time, RoutingInfo)


def held(cfg, m: Model) -> set:
    resident = set(m.reports[-1].get("chunks", ())) if m.reports else set()
    last_sent = {}
    for seen, info in m.sends:
        for h in info.chunk_hashes:
            last_sent[h] = seen
    # A send counts until a later report lists it, or sent_expiry_reports reports have
    # come since it (0: forever).
    keep = set()
    for h, seen in last_sent.items():
        later = m.reports[seen:]
        if not cfg.sent_expiry_reports or (len(later) < cfg.sent_expiry_reports
                                          and not any(h in r.get("chunks", ()) for r in later)):
            keep.add(h)
    return resident | keep


def prefix_blocks(m: Model, info: RoutingInfo) -> int:
    seen = {h for _, i in m.sends for h in i.prefix}
    n = 0
    while n < len(info.prefix) and info.prefix[n] in seen:
        n += 1
    return n


def brute_rank(cfg, models: dict, order: list, info: RoutingInfo, load: dict) -> tuple[str, list]:
    free = {r: (models[r].reports[-1] if models[r].reports else {}).get("free_blocks", 0) for r in order}
    score = {}
    for r in order:
        h, st = held(cfg, models[r]), set((models[r].reports[-1] if models[r].reports else {}).get("stored", ()))
        score[r] = sum(n if c in h else cfg.store_weight * n if c in st else 0 for c, n in info.chunks) + \
            prefix_blocks(models[r], info) * info.block_size
    lo, hi, mean1 = min(load.values()), max(load.values()), (sum(load.values()) + 1) / len(order)
    ref = sum(load.values()) / len(order) if cfg.load_guard == "replica" and cfg.load_reference == "mean" else lo

    def imbalanced(x, ref=ref):
        return x - ref > cfg.imbalanced_abs_threshold and x > cfg.imbalanced_rel_threshold * ref

    def over(r):
        if cfg.load_guard == "fleet":
            return False
        return imbalanced(load[r]) or bool(cfg.max_load_ratio) and 0 < load[r] and load[r] + 1 > cfg.max_load_ratio * mean1

    def key(r):
        return (-score[r], load[r], -free[r])
    by_load = sorted(order, key=lambda r: (load[r], -free[r]))
    if cfg.load_guard == "fleet" and imbalanced(hi, lo):
        return "load_fallback", by_load
    fit = [r for r in order if score[r] >= cfg.min_match_tokens and not over(r)]
    if fit:
        best = min(fit, key=key)
        return "affinity", [best] + sorted((r for r in order if r != best), key=key)
    matched = any(score[r] >= cfg.min_match_tokens for r in order)
    if cfg.spread == "rendezvous" and info.chunks:
        k = min(info.chunk_hashes)
        w = {r: int.from_bytes(hashlib.blake2b(f"{r}\0{k}".encode(), digest_size=8).digest(), "little") for r in order}
        return ("load_fallback" if matched else "no_match"), sorted(order, key=lambda r: (load[r], -w[r]))
    if matched:
        return "load_fallback", by_load
    routed = {r: len(models[r].sends) for r in order}
    return "no_match", sorted(order, key=lambda r: (load[r], routed[r]))


def random_info(rng, universe, prefixes) -> RoutingInfo:
    chunks = [rng.choice(universe) for _ in range(rng.randint(0, 4))]
    pre = rng.choice(prefixes)[:rng.randint(0, 3)]
    return RoutingInfo(tuple(chunks), tuple(pre), 4 if pre else 0)


CONFIGS = [RankerConfig(), RankerConfig(sent_expiry_reports=2), RankerConfig(max_load_ratio=1.2),
           RankerConfig(spread="least_routed", sent_expiry_reports=1),
           RankerConfig(min_match_tokens=0), RankerConfig(load_reference="mean"),
           RankerConfig.legacy(), RankerConfig.legacy(indexed=True), RankerConfig(indexed=False, store_weight=0)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.load_guard}-{c.spread}-{c.sent_expiry_reports}-{c.indexed}-"
                                                       f"{c.max_load_ratio}-{c.store_weight}-{c.min_match_tokens}-"
                                                       f"{c.load_reference}")
def test_ranker_equals_brute_force_ranking(cfg):
    rng = random.Random(zlib.crc32(repr(cfg).encode()))      # the same cases in every process
    universe = [(f"c{i}", rng.choice([0, 3, 8, 40])) for i in range(14)]
    prefixes = [[f"p{j}.{i}" for i in range(4)] for j in range(3)]
    decisions = defaultdict(int)
    for case in range(150):
        n = rng.choice([1, 2, 5, 17, 64])
        ranker, models = ChunkAffinityRanker(cfg), {r: Model() for r in range(n)}
        for _ in range(rng.randint(0, 6 * n)):
            r = rng.randrange(n)
            if rng.random() < 0.4:
                stats = {"chunks": [h for h, _ in rng.sample(universe, rng.randint(0, 5))],
                         "stored": [h for h, _ in rng.sample(universe, rng.randint(0, 3))],
                         "free_blocks": rng.randint(0, 3)}
                ranker.observe_stats(r, stats)
                ranker.observe_stats(r, stats)          # the same report again changes nothing
                models[r].reports.append(stats)
            else:
                info = random_info(rng, universe, prefixes)
                ranker.record_sent(r, info)
                models[r].sends.append((len(models[r].reports), info))
        order = list(range(n))
        rng.shuffle(order)
        busy = rng.choice([0, 1, 3])
        load = {r: rng.randint(0, busy) + (8 * (rng.random() < 0.3)) for r in order}
        info = random_info(rng, universe, prefixes)
        got = ranker.rank(info, order, load)
        want_decision, want = brute_rank(cfg, models, order, info, load)
        k = rng.choice([1, 2, 3, n])
        assert got.top(k) == want[:k], (case, k, got.top(k), want)       # the cheap path agrees
        decisions[want_decision] += 1
        assert got.decision == want_decision, (case, got, want)
        assert got.order == want, (case, got.order, want)
    assert len(decisions) == 3 or not cfg.min_match_tokens, decisions      # every path was taken


def test_expired_sends_and_bounded_memory():
    """A chunk sent to a replica is believed held while its reports do not list it yet
    (its request may still be queued there); once a report lists it, the next one
    without it (it was evicted) ends the belief. The legacy rules believe it for good.
    What the ranker remembers stays bounded however much traffic passes."""
    info = RoutingInfo((("doc", 100),))
    for cfg, believed in ((RankerConfig(), False), (RankerConfig.legacy(), True)):
        ranker = ChunkAffinityRanker(cfg)
        ranker.record_sent("a", info)
        for _ in range(5):
            ranker.observe_stats("a", {"chunks": []})       # queued: not admitted yet
        assert "doc" in ranker.held("a")
        ranker.observe_stats("a", {"chunks": ["doc"]})      # admitted
        ranker.observe_stats("a", {"chunks": []})           # evicted
        assert ("doc" in ranker.held("a")) is believed
        assert ranker.rank(info, ["b", "a"], {}).order[0] == ("a" if believed else "b")
    ranker = ChunkAffinityRanker(RankerConfig(sent_expiry_reports=3))
    ranker.record_sent("a", info)
    for _ in range(3):
        ranker.observe_stats("a", {"chunks": []})           # never admitted: the belief lapses
    assert "doc" not in ranker.held("a")
    for cfg in (RankerConfig(remembered_chunks=50), RankerConfig.legacy(remembered_chunks=5000)):
        ranker, sizes = ChunkAffinityRanker(cfg), []
        for i in range(3000):
            ranker.record_sent(i % 4, RoutingInfo(((f"c{i}", 10),), (f"p{i}",), 4))
            if i % 7 == 0:     # each replica reports once every 7 of its requests
                ranker.observe_stats(i % 4, {"chunks": [f"c{i - k}" for k in range(5)]})
            sizes.append(ranker.remembered())
        if cfg.sent_expiry_reports:   # per replica: unconfirmed sends of 30 reports, the prefix cap, the last report
            assert max(sizes[1000:]) <= 4 * (30 * 7 + 1 + 50 + 5)
        else:
            assert sizes[-1] >= 2 * 3000                     # grows with traffic



def test_probing_confirms_the_pick_against_a_stale_cache():
    """Cached queue lengths, some missing, some stale: the replicas the ranking picks
    are probed until the best ones are all probed, and the final ranking is the
    ranker's over what was cached and probed. An exact cache costs ``probe_top`` probes."""
    rng = random.Random(5)
    for case in range(200):
        n = rng.choice([3, 8, 40])
        ranker = ChunkAffinityRanker()
        for r in range(n):
            ranker.observe_stats(r, {"chunks": [f"c{i}" for i in range(4) if rng.random() < 0.3], "free_blocks": 0})
        truth = {r: rng.randint(0, 12) for r in range(n)}
        cached = {r: (None if rng.random() < 0.1 else truth[r] if rng.random() < 0.7 else rng.randint(0, 12))
                  for r in range(n)}
        asked = []

        async def probe(ids):
            asked.append(list(ids))
            return {i: truth[i] for i in ids}
        info = RoutingInfo(tuple((f"c{i}", 10) for i in range(4) if rng.random() < 0.5))
        ranking, probed = run_sync(rank_probing(ranker, info, list(range(n)), cached, probe))
        seen = {i for a in asked for i in a}
        assert probed == sum(map(len, asked)) and {r for r in range(n) if cached[r] is None} <= seen
        used = {r: truth[r] if r in seen else cached[r] for r in range(n)}
        if set(ranking.top(2)) <= seen:                      # confirmed, else the rounds ran out
            assert ranking.order == ranker.rank(info, list(range(n)), used).order
        exact, asked = dict(truth), []
        _, probed = run_sync(rank_probing(ranker, info, list(range(n)), exact, probe))
        assert probed == min(2, n)


def test_ranking_modules_import_neither_ray_nor_torch():
    code = ("import sys, router.ranking, router.probing, bench.fleet_sim; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bad", [dict(load_guard="global"), dict(spread="random"), dict(max_load_ratio=0.5),
                                 dict(imbalanced_abs_threshold=-1), dict(store_weight=-0.1), dict(indexed=1),
                                 dict(sent_expiry_reports=1.5)])
def test_ranker_config_is_validated(bad):
    with pytest.raises(ValueError):
        RankerConfig(**bad)


def small_run(policy, kind="zipf", replicas=6, requests=500, pool_blocks=1200, seed=1):
    wl = WorkloadConfig(kind=kind, requests=requests, tenants=4, docs_per_tenant=40, rate_per_s=6.0, seed=seed,
                        churn_every=5, burst_every=200, burst_len=50)
    corpus = Corpus(wl)
    trace = make_trace(wl, corpus)
    cfg = SimConfig(replicas, pool_blocks, stats_period_s=0.5, window=100, keep_snapshots=True)
    return trace, simulate(policy, trace, corpus, cfg, TIMES, progress=False)


def test_workload_routing_is_the_engine_layouts():
    wl = WorkloadConfig(kind="churn", requests=300, tenants=3, docs_per_tenant=30, churn_every=4)
    corpus = Corpus(wl)
    trace = make_trace(wl, corpus)
    for r in trace[::17]:
        lay = build_layout(segments_of(corpus, r), BLOCK_SIZE, True, fingerprint_of(r))
        assert r.routing.chunk_hashes == tuple(c.chunk_hash for c in lay.chunks)
        assert r.routing.prefix == tuple(lay.block_hashes[:len(r.routing.prefix)])
        assert r.chunk_tokens == tuple(c.num_tokens for c in lay.chunks)
        assert len(set(r.docs)) == len(r.docs) == wl.chunks_per_request
    assert max(d for r in trace[-30:] for d in r.docs) > wl.docs_per_tenant   # new documents appeared
    with pytest.raises(ValueError):
        WorkloadConfig(kind="steady")
    with pytest.raises(ValueError):
        SimConfig(replicas=0)


@pytest.mark.parametrize("kind", ["zipf", "churn", "burst"])
def test_hits_equal_a_recount_from_the_pools(kind):
    trace, res = small_run(make_policy("chunk_affinity", 6), kind)
    assert len(res.records) == len(trace)
    for t, rec in zip(trace, sorted(res.records, key=lambda r: r.index)):
        distinct = set(t.routing.chunk_hashes)
        assert rec.chunks == len(distinct)
        assert rec.hits == len(distinct & rec.resident_before)
    assert sum(res.served) == len(trace)


def test_hits_equal_a_recount_from_the_trace_when_nothing_is_evicted():
    """Pools that hold everything: a chunk hits iff an earlier admission on the same
    replica brought it. Counted from the trace and the admission order only."""
    trace, res = small_run(make_policy("power_of_two", 5), replicas=5, requests=300, pool_blocks=40_000)
    seen, hits = defaultdict(set), 0
    by_index = {t.index: t for t in trace}
    for rec in sorted(res.records, key=lambda r: r.admitted):
        chunks = set(by_index[rec.index].routing.chunk_hashes)
        hits += len(chunks & seen[rec.replica])
        seen[rec.replica] |= chunks
    assert hits == sum(r.hits for r in res.records)


def test_no_policy_beats_the_bounds_and_the_oracle_beats_them_all():
    rates = {}
    for name in POLICIES:
        trace, res = small_run(make_policy(name, 6), requests=400)
        s = summarize(res, 100)
        occurrences = sum(len(set(t.routing.chunk_hashes)) for t in trace)
        distinct = len({h for t in trace for h in t.routing.chunk_hashes})
        assert sum(r.hits for r in res.records) <= occurrences - distinct     # every chunk misses once
        rates[name] = s["hit_rate"]
    assert all(rates["oracle"] >= v for v in rates.values()), rates
    assert rates["chunk_affinity"] > rates["round_robin"], rates


def test_ingresses_share_no_state_but_agree_on_new_documents():
    """Four ingress routers, each with its own ranker: rendezvous spreading sends a new
    document to one replica whichever ingress sees it first."""
    pol = ChunkAffinity(8, ingresses=4)
    assert len({id(r) for r in pol.rankers}) == 4
    trace, res = small_run(pol, replicas=8, requests=300)
    assert sum(res.served) == 300
