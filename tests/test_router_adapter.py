"""The Serve adapter around the ranker (``router/chunk_router.py``): what it remembers
between reports, what it does with a malformed payload, what it probes, and what it
imports. The ranking itself is checked against a token oracle in
``test_router_ranking.py``."""
import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from mepic_ray.routing import PAYLOAD_KEY, RoutingInfo
from router.chunk_router import ChunkAffinityRouter
from router.ranker_config import RankerConfig

LEGACY = {f.name: getattr(RankerConfig.legacy(), f.name) for f in dataclasses.fields(RankerConfig)}


class Router(ChunkAffinityRouter):
    async def _probe_queue_lens(self, replicas, backoff_index):
        return [(r, self.fake_lens[r.replica_id]) for r in replicas]


def make_router(options=None):
    """The router with the first-shipped rules (``options`` None) or the defaults and ``options``."""
    r = Router(DeploymentID(name="EngineServer", app_name="t"), DeploymentHandleSource.UNKNOWN)
    r.initialize_state(**(LEGACY if options is None else options))
    return r


def test_store_copy_counts_less_than_a_resident_one():
    router = make_router()
    a = SimpleNamespace(replica_id="a", routing_stats={"chunks": ["c0"], "stored": []})
    b = SimpleNamespace(replica_id="b", routing_stats={"chunks": [], "stored": ["c0", "c1"]})
    c = SimpleNamespace(replica_id="c", routing_stats={"chunks": [], "stored": []})
    router.fake_lens = {"a": 0, "b": 0, "c": 0}
    req = SimpleNamespace(args=[{PAYLOAD_KEY: RoutingInfo(chunks=(("c0", 40), ("c1", 40)))}])
    tiers = asyncio.run(router._choose([c, b, a], req))
    assert [r.replica_id for r in tiers[0]] == ["a"] and router.last_ranking.order == ["a", "b", "c"]  # 40 > 0.25 * 80 > 0
    assert "c0" in router.ranker.held("a")          # remembered where it went, before any report
    router.fake_lens = {"a": 9, "b": 0, "c": 1}      # imbalanced: load wins over affinity
    tiers = asyncio.run(router._choose([c, b, a], req))
    assert router.last_decision == "load_fallback" and tiers[0][0].replica_id == "b"


def test_malformed_routing_is_no_routing():
    """A payload without a RoutingInfo (absent, a legacy dict, not a dict at all) is
    routed as unrelated traffic: the router must never raise."""
    router = make_router()
    a = SimpleNamespace(replica_id="a", routing_stats={"chunks": ["c0"]})
    b = SimpleNamespace(replica_id="b", routing_stats=None)
    router.fake_lens = {"a": 1, "b": 0}
    for req in (None, SimpleNamespace(args=[]), SimpleNamespace(args=["text"]), SimpleNamespace(args=[{}]),
                SimpleNamespace(args=[{PAYLOAD_KEY: {"chunks": [["c0", 40]]}}])):
        tiers = asyncio.run(router.choose_replicas([a, b], req))
        assert router.last_decision == "no_match" and tiers[0][0].replica_id == "b"


def test_router_imports_neither_torch_nor_the_engine():
    """The router runs inside every Serve handle; it must stay light (hashes arrive with
    the request). Of mepic_ray it may load only the torch-free routing contract (and
    the hashing it uses) beyond what the lazy package itself loads."""
    code = ("import sys, mepic_ray; pkg = set(sys.modules); "
            "import router, router.chunk_router, router.baselines; "
            "ok = {'mepic_ray.routing', 'mepic_ray.hashing'}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'deployments') "
            "or m.startswith('mepic_ray.') and m not in pkg and m not in ok); "
            "assert not bad, bad; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_default_rules_probe_only_what_they_need():
    """With Serve's queue-length cache filled, the router probes the replicas it would
    pick, not every candidate; a probe that finds the pick overloaded moves the
    request on. The first-shipped rules probe every candidate."""
    probed = []

    class Counting(Router):
        async def _probe_queue_lens(self, replicas, backoff_index):
            probed.append([r.replica_id for r in replicas])
            return [(r, self.fake_lens[r.replica_id]) for r in replicas]
    for options, want in (({}, [["r0", "r1"]]), (LEGACY, [[f"r{i}" for i in range(40)]])):
        router = Counting(DeploymentID(name="EngineServer", app_name="t"), DeploymentHandleSource.UNKNOWN)
        router.initialize_state(**options)
        replicas = [SimpleNamespace(replica_id=f"r{i}", routing_stats={"chunks": ["c0"] if i < 2 else [],
                                                                     "free_blocks": 0}) for i in range(40)]
        router.fake_lens = {r.replica_id: 1 for r in replicas}
        router.fake_lens["r0"] = 9                      # the cache does not know r0 is busy
        for r in replicas:
            router._replica_queue_len_cache.update(r.replica_id, 1)
        probed.clear()
        req = SimpleNamespace(args=[{PAYLOAD_KEY: RoutingInfo(chunks=(("c0", 40),))}])
        tiers = asyncio.run(router._choose(replicas, req))
        assert tiers[0][0].replica_id == "r1", (options, tiers[0])   # r0 holds c0 too, but is overloaded
        assert sorted(sum(probed, [])) == sorted(sum(want, [])), probed


def test_the_shipped_yaml_names_only_options_the_ranker_takes():
    """A misspelt key in ``request_router_kwargs`` would be ignored with a warning inside
    Serve, where nobody looks: every key the YAML sets must reach the ranker."""
    import logging

    import yaml
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "deployments/mepic.yaml").read_text())
    (engine,) = [d for d in spec["applications"][0]["deployments"] if d["name"] == "EngineServer"]
    kwargs = engine["request_router_config"]["request_router_kwargs"]

    class Caught(logging.Handler):      # Serve's logger does not propagate to the root one
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())
    caught, log = Caught(), logging.getLogger("ray.serve")
    log.addHandler(caught)
    try:
        router = make_router(kwargs)
        assert not [m for m in caught.messages if "unknown options" in m], caught.messages
        assert {k: getattr(router.ranker.config, k) for k in kwargs} == kwargs
        make_router({**kwargs, "prob_top": 3})
        assert any("prob_top" in m for m in caught.messages), caught.messages
    finally:
        log.removeHandler(caught)
