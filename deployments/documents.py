"""The document API's side in the ingress: parsing registrations, and the store
actor that keeps the registry (``mepic_ray.tier.documents``).

``POST /v1/chunks`` registers documents ahead of traffic: a replica compiles each
in the forms the two routes send it (the completions route sends the text as the
chunk, the chat route wraps it in its chunk template) and commits them to the
store in one call. ``GET``/``DELETE`` read and change the registry directly. A
request names a registered document as ``{"id": ...}`` in ``chunks``.
"""
from __future__ import annotations

from dataclasses import dataclass

from deployments.protocol import ApiError, _text, load_json
from mepic_ray.tier.documents import DOC_ID, DocumentError, check_metadata, text_digest

MAX_DOCUMENTS = 64          # per registration: one request's compile must stay bounded
ROUTES = ("completions", "chat")


@dataclass
class Registration:
    documents: list[dict]   # id, public, text, forms (route -> chunk text), metadata, pin, ttl_s
    warm: bool


def _flag(obj: dict, key: str, where: str) -> bool:
    v = obj.get(key, False)
    if not isinstance(v, bool):
        raise ApiError(f"{where}'{key}' must be a boolean", param=key)
    return v


def parse_registration(raw: bytes, separator: str, chunk_template: str, max_bytes: int) -> Registration:
    """The documents of a ``POST /v1/chunks`` body; raises ApiError (400) with a reason."""
    body = load_json(raw)
    if not isinstance(body, dict) or set(body) - {"documents", "warm"}:
        raise ApiError('the body must be {"documents": [...], "warm": boolean}')
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise ApiError("'documents' must be a non-empty list", param="documents")
    if len(docs) > MAX_DOCUMENTS:
        raise ApiError(f"at most {MAX_DOCUMENTS} documents per registration, got {len(docs)}", param="documents")
    out = []
    for i, d in enumerate(docs):
        where = f"document {i}: "
        if not isinstance(d, dict) or set(d) - {"text", "id", "metadata", "public", "pin", "ttl_s", "routes"}:
            raise ApiError(f"{where}an object with 'text' and optional 'id', 'metadata', 'public', 'pin', "
                           "'ttl_s', 'routes'", param="documents")
        text = d.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(f"{where}'text' must be a non-empty string", param="documents")
        _text(text, "documents")
        if len(text.encode()) > max_bytes:
            raise ApiError(f"{where}its {len(text.encode())} bytes cannot fit the model's context",
                           param="documents", code="context_length_exceeded")
        if separator in text:
            raise ApiError(f"{where}the text contains the chunk separator {separator!r}", param="documents")
        doc_id = d.get("id", f"doc-{text_digest(text)[:24]}")
        if not isinstance(doc_id, str) or not DOC_ID.fullmatch(doc_id):
            raise ApiError(f"{where}'id' must match {DOC_ID.pattern}", param="documents")
        ttl = d.get("ttl_s")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < 1e9):
            raise ApiError(f"{where}'ttl_s' must be a positive number of seconds", param="documents")
        pin = _flag(d, "pin", where)
        if ttl is not None and not pin:
            raise ApiError(f"{where}'ttl_s' is how long a pin lasts: it needs 'pin': true", param="documents")
        routes = d.get("routes", list(ROUTES))
        if not isinstance(routes, list) or not routes or not set(routes) <= set(ROUTES) \
                or len(set(routes)) < len(routes):
            raise ApiError(f"{where}'routes' must be a non-empty list of distinct {ROUTES}", param="documents")
        try:
            metadata = check_metadata(d.get("metadata"))
        except DocumentError as e:
            raise ApiError(where + e.message, param="documents")
        forms = {r: text if r == "completions" else chunk_template.replace("{chunk}", text) for r in routes}
        out.append({"id": doc_id, "public": _flag(d, "public", where), "text": text, "forms": forms,
                    "metadata": metadata, "pin": pin, "ttl_s": None if ttl is None else float(ttl)})
    return Registration(out, _flag(body, "warm", ""))


def chunk_ids(body) -> list[str]:
    """The ids of registered documents a completion or chat request names in ``chunks``."""
    chunks = body.get("chunks") if isinstance(body, dict) else None
    if not isinstance(chunks, list):
        return []
    ids = [c["id"] for c in chunks if isinstance(c, dict) and set(c) == {"id"}]
    for i in ids:
        if not isinstance(i, str) or not DOC_ID.fullmatch(i):
            raise ApiError(f"a chunk's 'id' must match {DOC_ID.pattern}", param="chunks")
    return list(dict.fromkeys(ids))


class DocumentStore:
    """The store actor as the ingress uses it; every answer is turned into a value or an ApiError."""

    def __init__(self):
        self._handle = None

    def handle(self, info: dict):
        import ray
        if info.get("store") is None:
            raise ApiError("documents need the object-store tier: add chunk_store to the app's config",
                           code="no_store")
        if self._handle is None:
            try:
                self._handle = ray.get_actor(info["store"]["name"], namespace=info["store"]["namespace"])
            except ValueError:   # no replica has created it yet
                raise ApiError("the chunk store is not running yet", status=503, retry_after=2)
        return self._handle

    async def call(self, info: dict, method: str, *args):
        """``{"ok": ...}`` answers give their value; errors raise ApiError (the store's status)."""
        try:
            answer = await getattr(self.handle(info), method).remote(*args)
        except ApiError:
            raise
        except Exception as e:   # the store died: the next call looks it up again
            self._handle = None
            raise ApiError(f"chunk store unavailable ({type(e).__name__})", status=503, retry_after=2)
        return ok(answer)


def ok(answer: dict):
    if "error" in answer:
        raise ApiError(answer["error"], status=answer.get("status", 500), code=answer.get("code"))
    return answer["ok"]
