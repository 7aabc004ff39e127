"""The cold tier: a detached, named Ray actor that owns chunk KV objects.

Chunk KV is stored at chunk-local positions, so blocks computed on one replica are
valid on every other replica at any position. The actor creates the objects itself
(``ray.put`` inside the actor) so it is their owner: they outlive the replica
that computed them, and die with the actor (readers then see a lost object and
recompute). The directory is a byte-budgeted LRU, as LMCache's storage
backends are; the eviction policy is the ``OrderedDict`` order.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import ray

from mepic_ray.hashing import PUBLIC_NAMESPACE
from mepic_ray.tier.documents import DocumentError, DocumentRegistry, NewDocument


@dataclass
class StoredChunk:
    meta: dict           # hash, token_ids, num_tokens, fingerprint, layout, nbytes
    ref: Any             # ObjectRef of the uint8 KV array, owned by the store actor
    last_use: float


class ChunkDirectory:
    """Chunk hash -> object, under a byte budget, least recently used evicted first;
    a pinned chunk (``pins``: hash -> until when, set by the document registry) is never
    evicted while its pin lasts."""

    def __init__(self, budget_bytes: int, clock=time.time):
        self.budget_bytes = budget_bytes
        self.clock = clock
        self.entries: OrderedDict[str, StoredChunk] = OrderedDict()
        self.pins: dict[str, float] = {}
        self.bytes_used = 0
        self.counts = {"puts": 0, "duplicates": 0, "rejected": 0, "evictions": 0, "hits": 0, "misses": 0,
                       "dropped": 0}

    def put(self, meta: dict, make_ref) -> bool:
        h, nbytes = meta["hash"], meta["nbytes"]
        if h in self.entries:        # demote once: a second copy would only waste the budget
            self.entries.move_to_end(h)
            self.counts["duplicates"] += 1
            return True
        now = self.clock()
        victims, freed = [], 0
        for old_h, old in self.entries.items():    # oldest first, pinned ones skipped
            if self.bytes_used - freed + nbytes <= self.budget_bytes:
                break
            if self.pins.get(old_h, 0.0) <= now:
                victims.append(old_h)
                freed += old.meta["nbytes"]
        if self.bytes_used - freed + nbytes > self.budget_bytes:   # pins hold the rest
            self.counts["rejected"] += 1
            return False
        ref = make_ref()
        for old_h in victims:
            self.bytes_used -= self.entries.pop(old_h).meta["nbytes"]   # dropping the ref frees the object
            self.counts["evictions"] += 1
        self.entries[h] = StoredChunk(meta, ref, now)
        self.bytes_used += nbytes
        self.counts["puts"] += 1
        return True

    def drop(self, h: str, ref: Any) -> bool:
        """Forget an entry a reader could not use, only if it still holds that same object
        (another replica may have replaced it meanwhile)."""
        e = self.entries.get(h)
        if e is None or e.ref != ref:
            return False
        del self.entries[h]
        self.bytes_used -= e.meta["nbytes"]
        self.counts["dropped"] += 1
        return True

    def discard(self, h: str) -> None:
        e = self.entries.pop(h, None)
        if e is not None:
            self.bytes_used -= e.meta["nbytes"]

    def lookup(self, hashes: list[str]) -> dict[str, StoredChunk]:
        found = {}
        for h in hashes:
            e = self.entries.get(h)
            if e is None:
                self.counts["misses"] += 1
                continue
            self.counts["hits"] += 1
            e.last_use = time.time()
            self.entries.move_to_end(h)
            found[h] = e
        return found


@ray.remote(num_cpus=0, max_restarts=0)
class ChunkStore:
    def __init__(self, budget_bytes: int, pin_budget_bytes: int | None = None):
        self.dir = ChunkDirectory(budget_bytes)
        self.docs = DocumentRegistry(budget_bytes // 2 if pin_budget_bytes is None else pin_budget_bytes)
        self._locations: tuple[float, dict] = (0.0, {})
        try:
            from ray.util import metrics
            self._bytes = metrics.Gauge("mepic_store_bytes", "bytes of chunk KV held in the object-store tier")
            self._lookups = metrics.Counter("mepic_store_lookups", "store lookups by result", tag_keys=("result",))
        except Exception:   # metrics are a nicety; the store must not depend on them
            self._bytes = self._lookups = None

    def put(self, meta: dict, kv) -> bool:
        ok = self.dir.put(meta, lambda: ray.put(kv))
        self._gauge()
        return ok

    def lookup(self, hashes: list[str]) -> dict[str, dict]:
        """Meta and ``[ref]`` per stored hash (the list keeps Ray from resolving the ref here)."""
        found = self.dir.lookup(hashes)
        if self._lookups is not None:
            if found:
                self._lookups.inc(len(found), tags={"result": "hit"})
            if len(hashes) > len(found):
                self._lookups.inc(len(hashes) - len(found), tags={"result": "miss"})
        return {h: {"meta": e.meta, "ref": [e.ref]} for h, e in found.items()}

    def drop(self, h: str, ref: list) -> bool:
        """A replica found this entry unreadable (object lost, bytes malformed): without
        this the dead entry would answer every later demotion of the chunk as a duplicate."""
        ok = self.dir.drop(h, ref[0])
        self._gauge()
        return ok

    def present(self, hashes: list[str]) -> list[str]:
        """Which of these the store still holds (no LRU touch: a replica checking is not a use)."""
        return [h for h in hashes if h in self.dir.entries]

    def recent(self, max_bytes: int, fingerprint: str) -> list[dict]:
        """Most recently used chunks of one model first, up to ``max_bytes``: what a new replica warms with."""
        out, total = [], 0
        for e in reversed(self.dir.entries.values()):
            if e.meta["fingerprint"] != fingerprint or total + e.meta["nbytes"] > max_bytes:
                continue
            out.append({"meta": e.meta, "ref": [e.ref]})
            total += e.meta["nbytes"]
        return out

    def holdings(self, node_id: str | None = None) -> dict[str, int]:
        """Chunk hash -> tokens; with ``node_id``, only objects with a copy on that node
        (a replica there loads them from shared memory, without a network transfer)."""
        # Every replica asks each routing-stats period: Ray drops a gauge not set for two
        # report intervals, and the store's bytes would vanish from the metrics while idle.
        self._gauge()
        if node_id is None:
            return {h: e.meta["num_tokens"] for h, e in self.dir.entries.items()}
        stamp, where = self._locations
        if time.time() - stamp > 1.0:    # one location query per second, however many replicas ask
            refs = {e.ref: h for h, e in self.dir.entries.items()}
            try:
                locs = ray.experimental.get_object_locations(list(refs), timeout_ms=1000)
                where = {refs[r]: set(v.get("node_ids", ())) for r, v in locs.items()}
            except Exception:
                where = {}
            self._locations = (time.time(), where)
        return {h: e.meta["num_tokens"] for h, e in self.dir.entries.items() if node_id in where.get(h, ())}

    def stats(self) -> dict:
        return {"bytes_used": self.dir.bytes_used, "budget_bytes": self.dir.budget_bytes,
                "num_chunks": len(self.dir.entries), "num_documents": len(self.docs.docs),
                "pinned_bytes": self.docs.pinned_bytes(), "pin_budget_bytes": self.docs.pin_budget_bytes,
                **self.dir.counts}

    # -- registered documents (answers are {"ok": ...} or {"error", "status", "code"}) --------
    @staticmethod
    def _answer(fn, *args) -> dict:
        try:
            return {"ok": fn(*args)}
        except DocumentError as e:
            return {"error": e.message, "status": e.status, "code": e.code}

    def documents_existing(self, owner: str, items: list) -> dict:
        return self._answer(self.docs.existing, owner, [tuple(x) for x in items])

    def documents_register(self, owner: str, new: list[dict], kvs: dict, warm: bool) -> dict:
        """All of ``new`` registered, pinned and stored, or nothing: ``kvs`` maps the hashes
        the store lacked to ``(meta, kv)``. A pinned hash that is neither here nor in ``kvs``
        (evicted since the replica looked) answers code ``need_kv``."""
        docs = [NewDocument(**d) for d in new]
        missing = {h for d in docs if d.pin for h in d.forms.values()
                   if h and h not in self.dir.entries and h not in kvs}
        if missing:
            return {"error": "pinned chunks left the store meanwhile", "status": 409, "code": "need_kv"}
        before = self.docs.snapshot()
        answer = self._answer(self.docs.commit, owner, docs, warm)
        if "error" in answer:
            return answer
        self.dir.pins = self.docs.pins()
        added = []
        try:   # pinned first: they always fit, since pins stay under a budget below the store's
            for h, (meta, kv) in sorted(kvs.items(), key=lambda x: x[0] not in self.dir.pins):
                if h not in self.dir.entries and self.dir.put(meta, lambda: ray.put(kv)):
                    added.append(h)
        except Exception as e:   # nothing half-registered: undo the entries and the commit
            for h in added:
                self.dir.discard(h)
            self.docs.restore(before)
            self.dir.pins = self.docs.pins()
            return {"error": f"the store could not hold the documents' KV ({type(e).__name__})", "status": 503,
                    "code": "store_failed"}
        self._gauge()
        stored = set(self.dir.entries)
        for view, d in zip(answer["ok"], docs):
            view["stored"] = all(h in stored for h in d.forms.values() if h)
        return answer

    def documents_resolve(self, owner: str, ids: list[str]) -> dict:
        return self._answer(lambda: [{"id": d.id, "text": d.text, "public": d.scope == PUBLIC_NAMESPACE}
                                     for d in (self.docs.find(owner, i) for i in ids)])

    def documents_list(self, owner: str) -> dict:
        now, stored = time.time(), set(self.dir.entries)
        return {"ok": [d.public_view(now, stored) for d in self.docs.visible(owner)]}

    def documents_get(self, owner: str, doc_id: str) -> dict:
        return self._answer(lambda: self.docs.find(owner, doc_id).public_view(time.time(), set(self.dir.entries)))

    def documents_delete(self, owner: str, doc_id: str) -> dict:
        answer = self._answer(self.docs.delete, owner, doc_id)
        if "ok" in answer:
            for h in answer["ok"]:
                self.dir.discard(h)
            self.dir.pins = self.docs.pins()
            self._gauge()
            answer["ok"] = len(answer["ok"])
        return answer

    def warm_since(self, cursor: int) -> tuple[list[dict], int]:
        """Chunks of documents registered with ``warm`` after ``cursor`` (what replicas poll)."""
        hashes, cursor = self.docs.warm_since(cursor)
        return [{"meta": self.dir.entries[h].meta, "ref": [self.dir.entries[h].ref]}
                for h in dict.fromkeys(hashes) if h in self.dir.entries], cursor

    def report_warm(self, replica: str, hashes: list[str]) -> None:
        self.docs.report_warm(replica, set(hashes))

    def _gauge(self) -> None:
        if self._bytes is not None:
            self._bytes.set(self.dir.bytes_used)

    def ping(self) -> bool:
        return True


def get_or_create_store(name: str, namespace: str, budget_bytes: int, pin_budget_bytes: int | None = None,
                        placement: str = "head"):
    """The cluster's one store actor; the first replica to ask creates it (and sets its
    budgets), on the head node unless ``placement`` is "local"."""
    where = {"resources": {"node:__internal_head__": 0.001}} if placement == "head" else {}
    return ChunkStore.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                              **where).remote(budget_bytes, pin_budget_bytes)
