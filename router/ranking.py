"""The chunk-affinity ranking, without Ray: what ``ChunkAffinityRouter`` decides, given
each candidate's queue length and routing stats. The Serve adapter
(``router/chunk_router.py``) and the fleet simulator (``bench/fleet_sim.py``) drive
this same class.

A replica's score is the tokens of the request it would not compute: chunk tokens in
its pool (its last routing stats, plus chunks this router sent it since), chunk tokens
in the object store on its node at ``store_weight``, and the leading text blocks this
router sent it before. Load decides when queues are imbalanced.

Two generations of the rules, picked by ``router.ranker_config.RankerConfig``: its
``legacy()`` is the router as first shipped, the defaults are what the fleet simulator
called for. ``router/probing.py`` decides which queue lengths to probe. Imports only the
standard library and ``mepic_ray.routing``.
"""
from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mepic_ray.routing import RoutingInfo
from router.ranker_config import RankerConfig


class Ranking:
    """The decision ("affinity", "load_fallback" or "no_match") and every candidate,
    best first: ``first`` as given, then each group of ``groups`` in turn, sorted by its
    key. A group is ``(members, key, levels)``, ``members`` a list or a function making
    it; with ``levels`` (a mapping to the first element of ``key``, a queue length)
    ``top(k)`` looks only at the lowest levels. The full ``order`` is sorted only when
    asked for, so ranking hundreds of replicas stays cheap for a caller that needs the
    first few (Serve takes the shortest queue of a tier, whatever its order). Ask before
    the ranker learns of new reports: the keys read its state lazily."""
    __slots__ = ("decision", "_first", "_groups", "_order")

    def __init__(self, decision: str, first: list, groups: Sequence = ()):
        self.decision, self._first = decision, list(first)
        self._groups = list(groups)
        self._order: list | None = None if self._groups else self._first

    @staticmethod
    def _members(group: tuple) -> list:
        members = group[0]
        return members() if callable(members) else members

    @property
    def order(self) -> list:
        if self._order is None:
            self._order = self._first + [r for g in self._groups for r in sorted(self._members(g), key=g[1])]
        return self._order

    def top(self, k: int) -> list:
        if self._order is not None:
            return self._order[:k]
        out = self._first[:k]
        for group in self._groups:
            need = k - len(out)
            if need <= 0:
                break
            members, key, levels = self._members(group), group[1], group[2]
            if levels is not None and len(members) > need:
                pool: list = []
                for lv in sorted({levels[r] for r in members}):
                    pool += [r for r in members if levels[r] == lv]
                    if len(pool) >= need:
                        break
                members = pool
            out += heapq.nsmallest(need, members, key=key)   # as sorted(...)[:need], ties in order
        return out

    def __repr__(self) -> str:
        return f"Ranking({self.decision!r}, {self.order!r})"


@dataclass
class _Replica:
    stats: Any = None                                              # the last report object seen
    resident: frozenset = frozenset()
    stored: frozenset = frozenset()
    free_blocks: int = 0
    reports: int = 0
    # hash -> the report count when it was last sent there; oldest first
    sent: OrderedDict = field(default_factory=OrderedDict)
    sent_prefix: OrderedDict = field(default_factory=OrderedDict)
    routed: int = 0


def _add(index: dict, key: str, rid: Hashable) -> None:
    s = index.get(key)
    if s is None:
        index[key] = {rid}
    else:
        s.add(rid)


def _discard(index: dict, key: str, rid: Hashable) -> None:
    s = index.get(key)
    if s is not None:
        s.discard(rid)
        if not s:
            del index[key]


def rendezvous_weight(replica_id: Hashable, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{replica_id}\0{key}".encode(), digest_size=8).digest(), "little")


class ChunkAffinityRanker:
    def __init__(self, config: RankerConfig | None = None):
        self.config = config or RankerConfig()
        self._replicas: dict[Hashable, _Replica] = {}
        # Inverted indexes: which replicas report a chunk, were sent it, store it, were sent a prefix block.
        self._resident_at: dict[str, set] = {}
        self._sent_at: dict[str, set] = {}
        self._stored_at: dict[str, set] = {}
        self._prefix_at: dict[str, set] = {}

    # -- state ----------------------------------------------------------------------
    def _state(self, rid: Hashable) -> _Replica:
        st = self._replicas.get(rid)
        if st is None:
            st = self._replicas[rid] = _Replica()
        return st

    def observe_stats(self, rid: Hashable, stats: Mapping | None) -> None:
        """The replica's current routing stats (``record_routing_stats``). Cheap when it is
        the report already seen: a new report is a new object."""
        st = self._state(rid)
        if stats is st.stats:
            return
        st.stats = stats
        stats = stats or {}
        resident, stored = frozenset(stats.get("chunks", ())), frozenset(stats.get("stored", ()))
        for old, new, index in ((st.resident, resident, self._resident_at), (st.stored, stored, self._stored_at)):
            for h in old - new:
                _discard(index, h, rid)
            for h in new - old:
                _add(index, h, rid)
        st.resident, st.stored = resident, stored
        st.free_blocks = stats.get("free_blocks", 0)
        st.reports += 1
        keep = self.config.sent_expiry_reports
        if keep:
            # A send the report confirms is the report's from now on (so its eviction
            # shows); one it never confirms (still queued there, or failed) lapses.
            for h in [h for h, tag in st.sent.items() if h in resident or tag <= st.reports - keep]:
                del st.sent[h]
                _discard(self._sent_at, h, rid)

    def observe_all(self, reports) -> None:
        """``observe_stats`` for each ``(replica, stats)``: one identity test each when
        nothing is new."""
        reps = self._replicas
        for rid, stats in reports:
            st = reps.get(rid)
            if st is None or stats is not st.stats:
                self.observe_stats(rid, stats)

    def record_sent(self, rid: Hashable, info: RoutingInfo) -> None:
        """The request went to ``rid``: remember its chunks and leading blocks there."""
        st = self._state(rid)
        st.routed += 1
        cap = self.config.remembered_chunks
        for table, index, hashes in ((st.sent, self._sent_at, info.chunk_hashes),
                                     (st.sent_prefix, self._prefix_at, info.prefix)):
            for h in hashes:
                if h not in table:
                    _add(index, h, rid)
                table[h] = st.reports
                table.move_to_end(h)
            while len(table) > cap:
                h, _ = table.popitem(last=False)
                _discard(index, h, rid)

    def forget(self, rid: Hashable) -> None:
        """The replica is gone."""
        st = self._replicas.pop(rid, None)
        if st is None:
            return
        for keys, index in ((st.resident, self._resident_at), (st.stored, self._stored_at),
                            (st.sent, self._sent_at), (st.sent_prefix, self._prefix_at)):
            for h in keys:
                _discard(index, h, rid)

    def held(self, rid: Hashable) -> set[str]:
        """Chunks the ranker believes ``rid`` holds."""
        st = self._replicas.get(rid)
        return set() if st is None else set(st.resident) | set(st.sent)

    def remembered(self) -> int:
        """Entries the ranker keeps (chunk and prefix memory, reports and indexes)."""
        return sum(len(st.sent) + len(st.sent_prefix) + len(st.resident) + len(st.stored)
                   for st in self._replicas.values())

    # -- scoring --------------------------------------------------------------------
    def _scores_by_scan(self, info: RoutingInfo, candidates: Sequence[Hashable]) -> dict:
        sw, score = self.config.store_weight, {}
        for rid in candidates:
            st = self._state(rid)
            held = set(st.resident) | set(st.sent)
            n = sum(n if h in held else sw * n if h in st.stored else 0 for h, n in info.chunks)
            p = 0
            while p < len(info.prefix) and info.prefix[p] in st.sent_prefix:
                p += 1
            score[rid] = n + p * info.block_size
        return score

    def _scores_by_index(self, info: RoutingInfo, candidates: Sequence[Hashable]) -> dict:
        """Only replicas that hold something of the request are touched (the rest score 0)."""
        sw, score = self.config.store_weight, {}
        for h, n in info.chunks:
            held = self._resident_at.get(h, ())
            sent = self._sent_at.get(h, ())
            for rid in held:
                score[rid] = score.get(rid, 0) + n
            for rid in sent:
                if rid not in held:
                    score[rid] = score.get(rid, 0) + n
            if sw:
                for rid in self._stored_at.get(h, ()):
                    if rid not in held and rid not in sent:
                        score[rid] = score.get(rid, 0) + sw * n
        if info.prefix:
            reach = self._prefix_at.get(info.prefix[0], set())
            depth = 1
            while reach:   # chained hashes: a replica sent block k was sent blocks 0..k-1 too
                nxt = reach & self._prefix_at.get(info.prefix[depth], set()) if depth < len(info.prefix) else set()
                for rid in reach - nxt:
                    score[rid] = score.get(rid, 0) + depth * info.block_size
                reach, depth = nxt, depth + 1
        wanted = set(candidates)
        return {rid: s for rid, s in score.items() if rid in wanted}

    # -- ranking --------------------------------------------------------------------
    def rank(self, info: RoutingInfo, candidates: Sequence[Hashable], load: Mapping[Hashable, int]) -> Ranking:
        """Every candidate, best first. ``load``: ongoing requests per candidate (missing: 0)."""
        cfg = self.config
        cands = list(candidates)
        if not cands:
            return Ranking("no_match", [])
        ld = load if len(load) == len(cands) and load.keys() >= set(cands) else {r: load.get(r, 0) for r in cands}
        reps = self._replicas

        def free(rid: Hashable) -> int:
            st = reps.get(rid)
            return st.free_blocks if st is not None else 0
        lo = min(ld.values())
        ref = sum(ld.values()) / len(ld) if cfg.load_guard == "replica" and cfg.load_reference == "mean" else lo

        def imbalanced(x: int, ref: float = ref) -> bool:
            return x - ref > cfg.imbalanced_abs_threshold and x > cfg.imbalanced_rel_threshold * ref

        def by_load_key(r: Hashable) -> tuple:
            return ld[r], -free(r)
        if cfg.load_guard == "fleet" and imbalanced(max(ld.values()), lo):
            return Ranking("load_fallback", [], [(cands, by_load_key, ld)])
        score = (self._scores_by_index if cfg.indexed else self._scores_by_scan)(info, cands)
        cap = cfg.max_load_ratio * (sum(ld.values()) + 1) / len(cands) if cfg.max_load_ratio else None

        def overloaded(rid: Hashable) -> bool:
            # One more request must fit under the cap; an idle replica is never over.
            x = ld[rid]
            return cfg.load_guard == "replica" and (imbalanced(x) or (cap is not None and 0 < x and x + 1 > cap))
        pos = None
        if cfg.min_match_tokens:    # only replicas in ``score`` can match; keep the candidates' order
            pos = {rid: i for i, rid in enumerate(cands)} if len(score) > 1 else None
            matched = sorted((r for r, v in score.items() if v >= cfg.min_match_tokens), key=pos.__getitem__) \
                if pos else [r for r, v in score.items() if v >= cfg.min_match_tokens]
        else:
            matched = cands
        fit = [rid for rid in matched if not overloaded(rid)]

        def affinity_key(r: Hashable) -> tuple:
            return -score.get(r, 0), ld[r], -free(r)
        if fit:
            best = min(fit, key=affinity_key)
            # Replicas that score, then the rest by load: the same order as sorting every
            # candidate by (-score, load, -free), since a score is never negative.
            scoring = [r for r in score if r != best and score[r]]
            if len(scoring) > 1:
                pos = pos or {rid: i for i, rid in enumerate(cands)}
                scoring.sort(key=pos.__getitem__)
            return Ranking("affinity", [best], [(scoring, affinity_key, None),
                                                (lambda: [r for r in cands if not score.get(r) and r != best],
                                                 by_load_key, ld)])
        decision = "load_fallback" if matched else "no_match"   # matched: the replicas that could reuse it are overloaded
        if cfg.spread == "rendezvous" and info.chunks:
            key = min(info.chunk_hashes)
            return Ranking(decision, [], [(cands, lambda r: (ld[r], -rendezvous_weight(r, key)), ld)])
        if matched:
            return Ranking(decision, [], [(cands, by_load_key, ld)])
        # Resident chunk counts would mislead here: a replica warmed from the store
        # holds many idle, evictable chunks.
        routed = {r: reps[r].routed if r in reps else 0 for r in cands}   # as of now: sends change it
        return Ranking(decision, [], [(cands, lambda r: (ld[r], routed[r]), ld)])
