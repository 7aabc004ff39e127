"""What the chunk-affinity ranker is told (``request_router_kwargs`` in the YAML), checked
when it is built. ``RankerConfig.legacy()`` is the router as first shipped; the defaults
are the fixes the fleet simulator called for (bench/README.md, "Fleet simulator").
Standard library only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOAD_GUARDS = ("fleet", "replica")
SPREADS = ("least_routed", "rendezvous")


@dataclass(frozen=True)
class RankerConfig:
    imbalanced_abs_threshold: int = 4
    imbalanced_rel_threshold: float = 1.5
    min_match_tokens: int = 1
    remembered_chunks: int = 4096
    # A chunk in the object store near a replica saves its compile but costs a load:
    # worth a fraction of one resident in the replica's pool.
    store_weight: float = 0.25
    # "fleet": any imbalance anywhere sends every request by load (SGLang's rule; with
    # hundreds of replicas some pair is nearly always imbalanced, so affinity stops).
    # "replica": only a replica that is itself overloaded loses its affinity.
    load_guard: str = "replica"
    # Beyond the imbalance test, a replica with more than this many times the mean
    # ongoing requests is overloaded too (0: off). Bounds the skew that affinity for a
    # few hot documents causes; the imbalance test alone allows any ratio to the mean.
    max_load_ratio: float = 0.0
    # What a replica's load is compared with in the imbalance test under the "replica"
    # guard: the least-loaded candidate ("min", SGLang's) or the mean ("mean").
    load_reference: str = "min"
    # A chunk sent to a replica counts as held until one of its routing reports lists it
    # (from then on its reports are the truth, so an eviction shows), or, if none does,
    # for this many reports (0: until ``remembered_chunks`` newer sends push it out, as
    # first shipped, so an evicted chunk stays believed held). Reports before the
    # request is admitted do not list it: this covers the longest queue wait expected.
    sent_expiry_reports: int = 30
    # Requests nothing can reuse go to the least-loaded replica, ties broken by "least_routed":
    # fewest requests from this router, or by "rendezvous": the highest hash of (replica,
    # the request's smallest chunk hash). Rendezvous is the same in every ingress's router and
    # for every request that shares that chunk, so new documents land on one replica.
    spread: str = "rendezvous"
    # Queue lengths come from Serve's cache (this router's own sends and completions keep
    # it current); only replicas missing from it, and this many of the best-ranked, are
    # probed before the choice stands. 0: probe every candidate for every request.
    probe_top: int = 2
    # Score through an inverted index (chunk -> replicas) kept up to date as reports
    # arrive, instead of rebuilding every candidate's resident set for every request.
    indexed: bool = True

    def __post_init__(self) -> None:
        for name in ("imbalanced_abs_threshold", "min_match_tokens", "remembered_chunks", "sent_expiry_reports",
                     "probe_top"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("imbalanced_rel_threshold", "store_weight", "max_load_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.max_load_ratio and self.max_load_ratio < 1:
            raise ValueError(f"max_load_ratio must be 0 (off) or >= 1, got {self.max_load_ratio}")
        if self.load_guard not in LOAD_GUARDS:
            raise ValueError(f"load_guard must be one of {LOAD_GUARDS}, got {self.load_guard!r}")
        if self.load_reference not in ("min", "mean"):
            raise ValueError(f"load_reference must be 'min' or 'mean', got {self.load_reference!r}")
        if self.spread not in SPREADS:
            raise ValueError(f"spread must be one of {SPREADS}, got {self.spread!r}")
        if not isinstance(self.indexed, bool):
            raise ValueError(f"indexed must be a bool, got {self.indexed!r}")

    @classmethod
    def legacy(cls, **overrides: Any) -> "RankerConfig":
        """The rules as first shipped, for comparison."""
        return cls(**{"load_guard": "fleet", "max_load_ratio": 0, "sent_expiry_reports": 0,
                      "spread": "least_routed", "indexed": False, "probe_top": 0, **overrides})
