"""The router's ranking against a brute-force oracle, over replica states that one
machine cannot produce for real (chunks in the object store on some nodes only).
Queue lengths and routing stats are given; everything else is the real router."""
import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from hypothesis import given, settings, strategies as st
from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from router.chunk_router import ChunkAffinityRouter

CHUNKS = [(f"c{i}", 10 * (i + 1)) for i in range(4)]
PREFIX = [f"p{i}" for i in range(3)]
BS = 8
STORE_W = 0.25


class Router(ChunkAffinityRouter):
    async def _probe_queue_lens(self, replicas, backoff_index):
        return [(r, self.fake_lens[r.replica_id]) for r in replicas]


def make_router():
    r = Router(DeploymentID(name="EngineServer", app_name="t"), DeploymentHandleSource.UNKNOWN)
    r.initialize_state(store_weight=STORE_W)
    return r


replica_state = st.fixed_dictionaries({
    "pool": st.sets(st.sampled_from([h for h, _ in CHUNKS])),
    "stored": st.sets(st.sampled_from([h for h, _ in CHUNKS])),
    "prefix_seen": st.integers(0, len(PREFIX)),
    "queue": st.integers(0, 3),        # balanced: never above the imbalance thresholds
    "free": st.integers(0, 100),
})


@settings(max_examples=150, deadline=None)
@given(states=st.lists(replica_state, min_size=2, max_size=4),
       wanted=st.lists(st.sampled_from(CHUNKS), unique=True, max_size=4), use_prefix=st.booleans())
def test_ranking_matches_oracle(states, wanted, use_prefix):
    router = make_router()
    replicas = [SimpleNamespace(replica_id=f"r{i}", routing_stats={"chunks": sorted(s["pool"]),
                                                                   "stored": sorted(s["stored"]),
                                                                   "free_blocks": s["free"]})
                for i, s in enumerate(states)]
    router.fake_lens = {r.replica_id: s["queue"] for r, s in zip(replicas, states)}
    for r, s in zip(replicas, states):
        if s["prefix_seen"]:
            router._sent_prefix[r.replica_id] = dict.fromkeys(PREFIX[:s["prefix_seen"]])
    prefix = PREFIX if use_prefix else []
    pending = SimpleNamespace(args=[{"routing": {"chunks": [list(c) for c in wanted], "prefix": prefix,
                                                 "block_size": BS}}])
    tiers = asyncio.run(router._choose(replicas, pending))

    def oracle(s):
        chunk = sum(n if h in s["pool"] else STORE_W * n if h in s["stored"] else 0 for h, n in wanted)
        return chunk + (s["prefix_seen"] * BS if prefix else 0)
    scores = {r.replica_id: oracle(s) for r, s in zip(replicas, states)}
    best = max(scores.values())
    first = [r.replica_id for r in tiers[0]]
    assert sorted(r.replica_id for t in tiers for r in t) == sorted(scores)   # every replica, once
    if best == 0:
        assert router.last_decision == "no_match" and len(first) == 1
        assert router.fake_lens[first[0]] == min(router.fake_lens.values())
    else:
        assert router.last_decision == "affinity"
        assert len(first) == 1 and scores[first[0]] == best
        tied = [k for k, v in scores.items() if v == best]
        assert router.fake_lens[first[0]] == min(router.fake_lens[k] for k in tied)   # ties go to the least loaded
        ranked = [r.replica_id for t in tiers for r in t]
        assert [scores[k] for k in ranked] == sorted(scores.values(), reverse=True)


def test_store_copy_counts_less_than_a_resident_one():
    router = make_router()
    a = SimpleNamespace(replica_id="a", routing_stats={"chunks": ["c0"], "stored": []})
    b = SimpleNamespace(replica_id="b", routing_stats={"chunks": [], "stored": ["c0", "c1"]})
    c = SimpleNamespace(replica_id="c", routing_stats={"chunks": [], "stored": []})
    router.fake_lens = {"a": 0, "b": 0, "c": 0}
    pending = SimpleNamespace(args=[{"routing": {"chunks": [["c0", 40], ["c1", 40]]}}])
    tiers = asyncio.run(router._choose([c, b, a], pending))
    assert [[r.replica_id for r in t] for t in tiers] == [["a"], ["b", "c"]]   # 40 > 0.25 * 80 > 0
    assert "c0" in router._sent["a"]          # remembered where it went, before any report
    router.fake_lens = {"a": 9, "b": 0, "c": 1}      # imbalanced: load wins over affinity
    tiers = asyncio.run(router._choose([c, b, a], pending))
    assert router.last_decision == "load_fallback" and tiers[0][0].replica_id == "b"


def test_router_imports_neither_torch_nor_the_engine():
    """The router runs inside every Serve handle; it must stay light (hashes arrive with the request)."""
    code = ("import sys, router.chunk_router, router.baselines; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mepic_ray', 'kernels', 'deployments')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
