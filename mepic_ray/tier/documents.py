"""Registered documents: ids a tenant gives its chunks ahead of traffic, and pins.

The registry lives in the store actor beside the chunk directory, so that a
registration and the KV it pins commit in one actor call: all of a request's
documents or none. It is torch-free and Ray-free; tests build it with a clock of
their own. Ids are scoped: a tenant's own, and the public scope every tenant reads
(its own scope first). A document keeps its text, so requests can name it by id,
and one chunk hash per route form (the completions route sends the text as the
chunk; the chat route wraps it in its chunk template, which is another chunk).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field

from mepic_ray.hashing import PUBLIC_NAMESPACE

DOC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_METADATA_BYTES = 4096
WARM_LOG = 4096          # warm announcements kept for replicas that poll (older ones are missed)


class DocumentError(Exception):
    """A refused registry operation, with the HTTP status the ingress answers."""

    def __init__(self, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def check_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise DocumentError("'metadata' must be a JSON object")
    if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        raise DocumentError(f"'metadata' must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return metadata


@dataclass
class Document:
    id: str
    scope: str                  # the owner's namespace, or PUBLIC_NAMESPACE
    owner: str                  # namespace of the tenant that registered it ("" with no tenants)
    digest: str                 # of the text: an id reused with other text is refused
    text: str
    tokens: int
    forms: dict[str, str]       # route -> chunk hash; "" when all of it is recomputed in context
    metadata: dict
    created: float
    pinned_until: float | None  # inf: until deleted; None: not pinned
    warm_replicas: set[str] = field(default_factory=set)

    def pinned(self, now: float) -> bool:
        return self.pinned_until is not None and self.pinned_until > now

    def public_view(self, now: float, stored: set[str]) -> dict:
        """What the owner and readers see: never a hash, the text, or the owner's name."""
        until = self.pinned_until
        return {"id": self.id, "object": "chunk", "tokens": self.tokens, "public": self.scope == PUBLIC_NAMESPACE,
                "metadata": self.metadata, "created": int(self.created), "pinned": self.pinned(now),
                "pin_expires_at": None if until is None or math.isinf(until) or not self.pinned(now) else int(until),
                "stored": all(h in stored for h in self.forms.values() if h),
                "routes": sorted(self.forms), "warm_replicas": len(self.warm_replicas)}


@dataclass(frozen=True)
class NewDocument:
    """One document of a registration, as the compiling replica describes it."""
    id: str
    public: bool
    text: str
    tokens: int
    forms: dict[str, str]
    nbytes: dict[str, int]      # chunk hash -> KV bytes in the tier
    metadata: dict
    pin: bool
    ttl_s: float | None


class DocumentRegistry:
    def __init__(self, pin_budget_bytes: int, clock=time.time):
        self.pin_budget_bytes = pin_budget_bytes
        self.clock = clock
        self.docs: dict[tuple[str, str], Document] = {}
        self.nbytes: dict[str, int] = {}
        self.warm_log: deque[tuple[int, str]] = deque(maxlen=WARM_LOG)
        self.warm_seq = 0

    @staticmethod
    def scope(owner: str, public: bool) -> str:
        return PUBLIC_NAMESPACE if public else owner

    def find(self, owner: str, doc_id: str) -> Document:
        """The tenant's own document of that id, else the public one; raises DocumentError (404)."""
        for scope in (owner, PUBLIC_NAMESPACE):
            d = self.docs.get((scope, doc_id))
            if d is not None:
                return d
        raise DocumentError(f"no document {doc_id!r} is registered", status=404, code="document_not_found")

    def existing(self, owner: str, items: list[tuple[str, bool, str]]) -> list[bool]:
        """For each (id, public, digest): whether it is registered already with that text;
        raises DocumentError (409) when the id holds another text. Checked before compiling
        and again at commit (another registration may come between)."""
        out = []
        for doc_id, public, digest in items:
            d = self.docs.get((self.scope(owner, public), doc_id))
            if d is not None and d.digest != digest:
                raise DocumentError(f"document {doc_id!r} is registered with other text: delete it first or "
                                    "choose another id", status=409, code="document_exists")
            out.append(d is not None)
        return out

    def pins(self) -> dict[str, float]:
        """Chunk hash -> until when it is pinned (the latest of the documents pinning it)."""
        now, out = self.clock(), {}
        for d in self.docs.values():
            if d.pinned(now):
                for h in d.forms.values():
                    if h:
                        out[h] = max(out.get(h, 0.0), d.pinned_until)
        return out

    def pinned_bytes(self, pins: dict[str, float] | None = None) -> int:
        return sum(self.nbytes.get(h, 0) for h in (self.pins() if pins is None else pins))

    def commit(self, owner: str, new: list[NewDocument], warm: bool) -> list[dict]:
        """Register all of ``new`` or nothing (raises DocumentError). A document already
        registered with the same text is kept, its pin and metadata set as now asked."""
        now = self.clock()
        self.existing(owner, [(n.id, n.public, text_digest(n.text)) for n in new])
        ids = [(self.scope(owner, n.public), n.id) for n in new]
        if len(set(ids)) < len(ids):
            raise DocumentError("a registration names one id twice")
        staged: dict[tuple[str, str], Document] = {}
        for key, n in zip(ids, new):
            old = self.docs.get(key)
            until = (now + n.ttl_s if n.ttl_s is not None else math.inf) if n.pin else None
            staged[key] = Document(n.id, key[0], owner, text_digest(n.text), n.text, n.tokens, dict(n.forms),
                                   n.metadata or (old.metadata if old else {}), old.created if old else now, until,
                                   set(old.warm_replicas) if old else set())
        before = self.snapshot()
        self.docs.update(staged)
        for n in new:
            self.nbytes.update(n.nbytes)
        used = self.pinned_bytes()
        if used > self.pin_budget_bytes:
            self.restore(before)
            raise DocumentError(f"pinning these documents would hold {used} bytes of KV, over the pin budget of "
                                f"{self.pin_budget_bytes} bytes (chunk_store.pin_budget_bytes): pin fewer, or "
                                "delete pinned ones", status=409, code="pin_budget_exceeded")
        if warm:
            for d in staged.values():
                for h in d.forms.values():
                    if h:
                        self.warm_seq += 1
                        self.warm_log.append((self.warm_seq, h))
        return [{**staged[k].public_view(now, set()), "status": "exists" if k in before[0] else "registered"}
                for k in ids]

    def snapshot(self) -> tuple:
        """Everything a failed registration must put back (a registration replaces documents, never mutates them)."""
        return dict(self.docs), dict(self.nbytes), self.warm_seq, list(self.warm_log)

    def restore(self, snap: tuple) -> None:
        self.docs, self.nbytes, self.warm_seq = dict(snap[0]), dict(snap[1]), snap[2]
        self.warm_log = deque(snap[3], maxlen=WARM_LOG)

    def delete(self, owner: str, doc_id: str) -> set[str]:
        """Forget the tenant's document (or a public one it registered); the chunk hashes
        no other document holds are returned, for the tier to drop."""
        d = self.find(owner, doc_id)
        if d.owner != owner:
            raise DocumentError(f"document {doc_id!r} is public and was registered by another tenant",
                                status=403, code="not_owner")
        del self.docs[(d.scope, d.id)]
        held = {h for other in self.docs.values() for h in other.forms.values()}
        gone = {h for h in d.forms.values() if h and h not in held}
        for h in gone:
            self.nbytes.pop(h, None)
        return gone

    def visible(self, owner: str) -> list[Document]:
        own = [d for (scope, _), d in self.docs.items() if scope == owner]
        return own + [d for (scope, _), d in self.docs.items() if scope == PUBLIC_NAMESPACE and scope != owner]

    def warm_since(self, cursor: int) -> tuple[list[str], int]:
        return [h for seq, h in self.warm_log if seq > cursor], self.warm_seq

    def report_warm(self, replica: str, hashes: set[str]) -> None:
        for d in self.docs.values():
            if any(h in hashes for h in d.forms.values() if h):
                d.warm_replicas.add(replica)
