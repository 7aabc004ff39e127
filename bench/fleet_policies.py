"""Routing policies for the fleet simulator. Each ``choose(req, fleet, now)`` returns a
replica index; ``fleet`` is the list of ``SimReplica``. Only the chunk-affinity policy
is this project's router (the real ``router.ranking`` code); the others are
re-implementations of what their projects document:

* round robin; power of two choices (Ray Serve's default: two replicas at random, the
  shorter queue);
* ``prefix_tree``: Ray's ``PrefixCacheAffinityRouter`` as in the installed Ray's
  source (ray/llm/_internal/serve/routing_policies/prefix_aware): one prefix tree of
  every routed prompt; when the queues are balanced (max - min <= ``imbalanced_threshold``,
  default infinity), the replicas with the longest match if it covers at least
  ``match_rate_threshold`` (0.1) of the prompt, else those with the fewest characters
  in the tree; of those, the shortest queue. Imbalanced: power of two. No eviction
  (its default). The tree is over prompt segments weighted by tokens, not characters:
  the documents here share no text, so both match the same prefixes;
* ``dynamo``: NVIDIA Dynamo's KV router cost, ``overlap_weight * prefill blocks +
  active blocks``, lowest wins (temperature 0). Its overlap normally comes from a
  prefix-chained block index; here it is given every replica's exact resident chunks
  (as if Dynamo's indexer received this engine's chunk events), to compare the cost
  function and not the index;
* ``oracle``: knows every pool and queue exactly, ignores load: most resident (or
  already queued) chunk tokens, ties to the shortest queue then the fewest requests
  sent (``bench/routing.py``'s oracle, on live pools).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Callable

from bench.fleet_workloads import BLOCK_SIZE, TraceRequest
from router.probing import rank_probing, run_sync
from router.ranker_config import RankerConfig
from router.ranking import ChunkAffinityRanker


class RoundRobin:
    name = "round_robin"

    def __init__(self, n: int, seed: int = 0):
        self.i = -1

    def choose(self, req: TraceRequest, fleet: list, now: float) -> int:
        self.i += 1
        return self.i % len(fleet)


def two_choices(rng: random.Random, fleet: list) -> int:
    if len(fleet) == 1:
        return 0
    a, b = rng.sample(range(len(fleet)), 2)
    return a if fleet[a].load < fleet[b].load or fleet[a].load == fleet[b].load and rng.random() < 0.5 else b


class PowerOfTwo:
    name = "power_of_two"

    def __init__(self, n: int, seed: int = 0):
        self.rng = random.Random(seed)

    def choose(self, req: TraceRequest, fleet: list, now: float) -> int:
        return two_choices(self.rng, fleet)


class _Node:
    __slots__ = ("children", "tenants")

    def __init__(self) -> None:
        self.children: dict = {}
        self.tenants: set[int] = set()


class PrefixTree:
    """Ray's PrefixCacheAffinityRouter (see the module docstring)."""
    name = "prefix_tree"

    def __init__(self, n: int, seed: int = 0, imbalanced_threshold: float = math.inf,
                 match_rate_threshold: float = 0.1):
        self.rng = random.Random(seed)
        self.root = _Node()
        self.chars = [0] * n
        self.nodes = 1
        self.imbalanced_threshold, self.match_rate_threshold = imbalanced_threshold, match_rate_threshold

    @staticmethod
    def text(req: TraceRequest) -> list[tuple[tuple, int]]:
        sys_tokens = req.routing.block_size * len(req.routing.prefix)
        # The question is unique to the request; its mean length (12-40 tokens) stands in.
        return [(("s", req.tenant), sys_tokens), *((("d", req.tenant, d), n) for d, n in zip(req.docs, req.chunk_tokens)),
                (("q", req.index), 26)]

    def memory(self) -> int:
        """Tree nodes: without eviction (Ray's default) one or more per request, for good."""
        return self.nodes

    def _shortest(self, fleet: list, ids) -> int:
        return min(ids, key=lambda r: (fleet[r].load, self.rng.random()))

    def choose(self, req: TraceRequest, fleet: list, now: float) -> int:
        loads = [r.load for r in fleet]
        text = self.text(req)
        if max(loads) - min(loads) > self.imbalanced_threshold:
            rid = two_choices(self.rng, fleet)
        else:
            node, matched, tenants = self.root, 0, None
            for key, n in text:
                child = node.children.get(key)
                if child is None:
                    break
                node, matched, tenants = child, matched + n, child.tenants
            if tenants and matched / sum(n for _, n in text) >= self.match_rate_threshold:
                rid = self._shortest(fleet, tenants)
            else:
                least = min(self.chars)
                rid = self._shortest(fleet, [r for r, c in enumerate(self.chars) if c == least])
        node = self.root
        for key, n in text:
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node()
                self.nodes += 1
            if rid not in child.tenants:
                child.tenants.add(rid)
                self.chars[rid] += n
            node = child
        return rid


def _resident_tokens(req: TraceRequest, replica, queued: bool) -> int:
    """Chunk tokens of ``req`` in the replica's pool (or, with ``queued``, in requests
    waiting there, which will bring them)."""
    entries, pending = replica.kv.chunks.entries, replica.pending_chunks if queued else {}
    return sum(n for (h, n) in req.routing.chunks if h in entries or h in pending)


class Dynamo:
    name = "dynamo"

    def __init__(self, n: int, seed: int = 0, overlap_weight: float = 1.0):
        self.rng = random.Random(seed)
        self.overlap_weight = overlap_weight
        # Blocks Dynamo predicted each replica still has to prefill, from its own decisions.
        self.prefill_blocks = [0] * n
        self.predicted: dict[int, int] = {}

    def choose(self, req: TraceRequest, fleet: list, now: float) -> int:
        bs = BLOCK_SIZE
        blocks = -(-(sum(req.chunk_tokens) + len(req.routing.prefix) * bs + 24) // bs)
        best, best_key = 0, (math.inf, 0.0)
        for r in fleet:
            new = blocks - _resident_tokens(req, r, queued=False) // bs
            pool = r.kv.pool
            active = pool.num_blocks - pool.num_free - r.kv.chunks.idle_blocks + blocks
            key = (self.overlap_weight * (new + self.prefill_blocks[r.rid]) + active, self.rng.random())
            if key < best_key:
                best, best_key, best_new = r.rid, key, new
        self.prefill_blocks[best] += best_new
        self.predicted[req.index] = best_new
        return best

    def on_prefill_done(self, rid: int, req: TraceRequest) -> None:
        self.prefill_blocks[rid] -= self.predicted.pop(req.index)


class Oracle:
    name = "oracle"

    def __init__(self, n: int, seed: int = 0):
        self.sent = [0] * n

    def choose(self, req: TraceRequest, fleet: list, now: float) -> int:
        rid = max(range(len(fleet)), key=lambda r: (_resident_tokens(req, fleet[r], queued=True), -fleet[r].load, -self.sent[r]))
        self.sent[rid] += 1
        return rid


class BoundedOracle(Oracle):
    """The oracle's knowledge under a load bound: only replicas whose ongoing requests,
    with this one, stay within ``max_ratio`` of the mean (or the least loaded) may take
    the request."""
    name = "oracle_bounded"

    def __init__(self, n: int, seed: int = 0, max_ratio: float = 1.25):
        super().__init__(n, seed)
        self.max_ratio = max_ratio

    def choose(self, req: TraceRequest, fleet: list, now: float) -> int:
        loads = [r.load for r in fleet]
        cap, lo = self.max_ratio * (sum(loads) + 1) / len(fleet), min(loads)
        ok = [i for i, x in enumerate(loads) if x + 1 <= cap or x == lo]
        rid = max(ok, key=lambda r: (_resident_tokens(req, fleet[r], queued=True), -loads[r], -self.sent[r]))
        self.sent[rid] += 1
        return rid


@dataclass
class ChunkAffinity:
    """This project's ranker, one per ingress replica (requests spread over the
    ingresses in turn, as a load balancer in front of Serve's proxies would), fed each
    replica's last routing report. Queue lengths as Serve gives them: each ingress's
    cache (set by its probes and by each replica's reply to a request it sent, less one
    per completion of its own requests, dropped after ``CACHE_TTL_S``), probing as
    ``router.probing.rank_probing`` asks, as the Serve adapter does."""
    n: int
    seed: int = 0
    config: RankerConfig | None = None
    ingresses: int = 1
    name: str = "chunk_affinity"
    # Diagnostic: every replica reports its pool (and what is queued for it) before every
    # decision, so the ranker knows what the oracle knows.
    fresh_stats: bool = False

    CACHE_TTL_S = 10.0      # Ray Serve's RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S

    def __post_init__(self) -> None:
        self.rankers = [ChunkAffinityRanker(self.config or RankerConfig()) for _ in range(self.ingresses)]
        self.caches: list[dict[int, tuple[int, float]]] = [{} for _ in range(self.ingresses)]
        self.sender: dict[int, int] = {}
        self.ids = list(range(self.n))
        self.i = -1
        self.decisions: dict[str, int] = {}
        self.probes = 0

    def choose(self, req: TraceRequest, fleet: list, now: float) -> int:
        self.i += 1
        k = self.i % len(self.rankers)
        ranker, cache = self.rankers[k], self.caches[k]
        if self.fresh_stats:
            for r in fleet:
                r.report()
                r.stats["chunks"] += list(r.pending_chunks)
        ranker.observe_all((r.rid, r.stats) for r in fleet)
        cached = {}
        for rid in self.ids:
            v = cache.get(rid)
            cached[rid] = v[0] if v is not None and now - v[1] <= self.CACHE_TTL_S else None

        async def probe(ids: list) -> dict:
            got = {i: fleet[i].load for i in ids}
            cache.update((i, (q, now)) for i, q in got.items())
            return got
        ranking, probes = run_sync(rank_probing(ranker, req.routing, self.ids, cached, probe))
        rid = ranking.top(1)[0]
        ranker.record_sent(rid, req.routing)
        cache[rid] = (fleet[rid].load + 1, now)      # the replica's reply counts this request
        self.sender[req.index] = k
        self.probes += probes
        self.decisions[ranking.decision] = self.decisions.get(ranking.decision, 0) + 1
        return rid

    def on_report(self, rid: int, stats: dict) -> None:
        """A new routing report reaches every ingress (Serve's ``update_replicas``), not
        during a decision."""
        for ranker in self.rankers:
            ranker.observe_stats(rid, stats)

    def on_finish(self, rid: int, req: TraceRequest, now: float) -> None:
        cache = self.caches[self.sender.pop(req.index)]
        v = cache.get(rid)
        if v is not None:
            cache[rid] = (max(0, v[0] - 1), now)

    def memory(self) -> int:
        return sum(r.remembered() for r in self.rankers)


def make_policy(spec: str, n: int, seed: int = 0, ingresses: int = 1):
    """``name`` or ``chunk_affinity:key=value,...`` (``RankerConfig`` fields, plus
    ``fresh_stats`` and ``legacy``: the first-shipped rules, overrides after it)."""
    name, _, opts = spec.partition(":")
    if not opts:
        kw = {"ingresses": ingresses} if name.startswith("chunk_affinity") else {}
        return POLICIES[name](n, seed, **kw)
    if name != "chunk_affinity":
        raise ValueError(f"only chunk_affinity takes options, got {spec!r}")
    types = {f.name: f.type for f in fields(RankerConfig)}
    conv = {"int": int, "float": float, "str": str, "bool": lambda v: v in ("1", "true", "True")}
    cfg, legacy, fresh = {}, False, False
    for kv in opts.split(","):
        k, _, v = kv.partition("=")
        if k == "legacy" and conv["bool"](v or "1"):
            legacy = True
        elif k == "fresh_stats":
            fresh = conv["bool"](v or "1")
        elif k in types:
            cfg[k] = conv[types[k]](v)
        else:
            raise ValueError(f"unknown chunk_affinity option {k!r}")
    config = RankerConfig.legacy(**cfg) if legacy else RankerConfig(**cfg)
    return ChunkAffinity(n, seed, config, ingresses, spec, fresh)


POLICIES: dict[str, Callable] = {
    "round_robin": RoundRobin, "power_of_two": PowerOfTwo, "prefix_tree": PrefixTree, "dynamo": Dynamo,
    "chunk_affinity": ChunkAffinity, "oracle": Oracle, "oracle_bounded": BoundedOracle,
    "chunk_affinity_legacy": lambda n, seed=0, **kw: ChunkAffinity(n, seed, RankerConfig.legacy(), name="chunk_affinity_legacy", **kw),
}
