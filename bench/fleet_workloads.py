"""Traces for the fleet simulator: multi-tenant RAG with Zipf document popularity,
document churn and bursts.

Every request is one tenant's system prompt, ``chunks_per_request`` distinct documents
of that tenant in random order, and a question. Tokens are bytes (a vocabulary of 256):
documents are stored compactly and each token is one of Python's cached small ints.
Each request carries the ``RoutingInfo`` the ingress would build for it
(``mepic_ray.routing.build_routing``, hashed in the tenant's namespace), and
:func:`segments_of` gives the engine's segments for the same prompt.
"""
from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

from mepic_ray.hashing import namespace_fingerprint
from mepic_ray.routing import RoutingInfo, build_routing
from mepic_ray.segments import Segment

FINGERPRINT = "fleet-sim-model"
BLOCK_SIZE = 16
KINDS = ("zipf", "churn", "burst")


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "zipf"
    requests: int = 10_000
    tenants: int = 16
    docs_per_tenant: int = 200
    chunks_per_request: int = 4
    min_doc_tokens: int = 150
    max_doc_tokens: int = 450
    tenant_zipf: float = 1.0
    doc_zipf: float = 1.1
    system_tokens: int = 64
    min_question_tokens: int = 12
    max_question_tokens: int = 40
    output_tokens: int = 32
    rate_per_s: float = 1.0
    # churn: a tenant publishes a new document (its most popular from then on) every
    # this many of its requests; every older one moves down a rank, so it cools off.
    churn_every: int = 20
    # burst: every ``burst_every`` requests, ``burst_len`` arrive ``burst_factor`` times
    # faster and ``burst_share`` of them come from one tenant picked for the burst.
    burst_every: int = 2000
    burst_len: int = 400
    burst_factor: float = 4.0
    burst_share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("requests", "tenants", "docs_per_tenant", "chunks_per_request", "min_doc_tokens",
                     "system_tokens", "min_question_tokens", "output_tokens", "churn_every", "burst_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chunks_per_request > self.docs_per_tenant:
            raise ValueError("chunks_per_request must not exceed docs_per_tenant")
        if self.max_doc_tokens < self.min_doc_tokens or self.max_question_tokens < self.min_question_tokens:
            raise ValueError("a max length is below its min")
        if self.rate_per_s <= 0 or self.burst_factor < 1 or not 0 <= self.burst_share <= 1:
            raise ValueError("rate_per_s must be > 0, burst_factor >= 1, burst_share in [0, 1]")
        if not 0 <= self.burst_len <= self.burst_every:
            raise ValueError("burst_len must be in [0, burst_every]")


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float
    tenant: int
    docs: tuple[int, ...]         # document ids in prompt order
    output_tokens: int
    routing: RoutingInfo
    chunk_tokens: tuple[int, ...]  # real tokens of each chunk, in prompt order

    @property
    def namespace(self) -> str:
        return f"t{self.tenant}"


def _cdf(n: int, s: float) -> list[float]:
    w = list(itertools.accumulate(1 / (k + 1) ** s for k in range(n)))
    return [x / w[-1] for x in w]


class Corpus:
    """Token bytes of system prompts, documents and questions, made on first use from
    seeds, so that a document is the same in every trace of one seed."""

    def __init__(self, cfg: WorkloadConfig):
        self.cfg = cfg
        self._docs: dict[tuple[int, int], bytes] = {}
        self._systems: dict[int, bytes] = {}

    def doc(self, tenant: int, doc: int) -> bytes:
        key = (tenant, doc)
        b = self._docs.get(key)
        if b is None:
            rng = random.Random(f"{self.cfg.seed}/doc/{tenant}/{doc}")
            b = self._docs[key] = rng.randbytes(rng.randint(self.cfg.min_doc_tokens, self.cfg.max_doc_tokens))
        return b

    def system(self, tenant: int) -> bytes:
        b = self._systems.get(tenant)
        if b is None:
            b = self._systems[tenant] = random.Random(f"{self.cfg.seed}/system/{tenant}").randbytes(
                self.cfg.system_tokens)
        return b

    def question(self, index: int) -> bytes:
        rng = random.Random(f"{self.cfg.seed}/question/{index}")
        return rng.randbytes(rng.randint(self.cfg.min_question_tokens, self.cfg.max_question_tokens))

    def items(self, r: TraceRequest) -> list:
        """The payload items the ingress would get (keys the ``encode`` below resolves)."""
        return [f"s/{r.tenant}", *({"chunk": f"d/{r.tenant}/{d}"} for d in r.docs), f"q/{r.index}"]

    def encode(self, key: str) -> list[int]:
        kind, *rest = key.split("/")
        b = (self.system(int(rest[0])) if kind == "s" else self.doc(int(rest[0]), int(rest[1])) if kind == "d"
             else self.question(int(rest[0])))
        return list(b)


def segments_of(corpus: Corpus, r: TraceRequest) -> list[Segment]:
    """What ``tokenize_segments`` makes of the prompt (no BOS): text, chunks, text."""
    return [Segment(False, list(corpus.system(r.tenant))),
            *(Segment(True, list(corpus.doc(r.tenant, d))) for d in r.docs),
            Segment(False, list(corpus.question(r.index)))]


def fingerprint_of(r: TraceRequest) -> str:
    return namespace_fingerprint(FINGERPRINT, r.namespace)


def make_trace(cfg: WorkloadConfig, corpus: Corpus | None = None) -> list[TraceRequest]:
    corpus = corpus or Corpus(cfg)
    rng = random.Random(f"{cfg.seed}/trace/{cfg.kind}")
    tenant_cdf, doc_cdf = _cdf(cfg.tenants, cfg.tenant_zipf), _cdf(cfg.docs_per_tenant, cfg.doc_zipf)
    seen_by_tenant = [0] * cfg.tenants
    t, burst_tenant, out = 0.0, 0, []
    for i in range(cfg.requests):
        in_burst = cfg.kind == "burst" and cfg.burst_len and i % cfg.burst_every >= cfg.burst_every - cfg.burst_len
        if in_burst and i % cfg.burst_every == cfg.burst_every - cfg.burst_len:
            burst_tenant = rng.randrange(cfg.tenants)
        t += rng.expovariate(cfg.rate_per_s * (cfg.burst_factor if in_burst else 1.0))
        tenant = burst_tenant if in_burst and rng.random() < cfg.burst_share else \
            bisect.bisect_left(tenant_cdf, rng.random())
        newest = cfg.docs_per_tenant - 1
        if cfg.kind == "churn":
            newest += seen_by_tenant[tenant] // cfg.churn_every
        seen_by_tenant[tenant] += 1
        ranks: list[int] = []
        while len(ranks) < cfg.chunks_per_request:
            k = min(bisect.bisect_left(doc_cdf, rng.random()), cfg.docs_per_tenant - 1)
            if k not in ranks:
                ranks.append(k)
        rng.shuffle(ranks)
        # Rank 0 is the newest document: with churn, each new one takes the top rank.
        docs = tuple(newest - k for k in ranks)
        stub = TraceRequest(i, t, tenant, docs, cfg.output_tokens, RoutingInfo(), ())
        routing = build_routing(corpus.items(stub), corpus.encode, FINGERPRINT, BLOCK_SIZE,
                                namespace=stub.namespace)
        out.append(TraceRequest(i, t, tenant, docs, cfg.output_tokens, routing,
                                tuple(len(corpus.doc(tenant, d)) for d in docs)))
    return out
