"""The routing contract between the ingress and the chunk-affinity router.

The ingress builds a :class:`RoutingInfo` for each request (:func:`build_routing`)
and puts it in the request payload under :data:`PAYLOAD_KEY`; the router reads it
back from Serve's ``PendingRequest`` (:func:`routing_of`). The object travels
through Ray pickling to the replica, which ignores it.

Tenants: every hash is rooted at the request's namespace
(``mepic_ray.hashing.namespace_fingerprint``) but a public chunk's, rooted at the
model fingerprint; :func:`tenant_layout` makes the engine's layout the same way.

Torch-free and engine-free: this module imports only the standard library and
``mepic_ray.hashing``, so that the router (which runs in every Serve handle) stays
light. The hashes are the engine's own, so both sides agree bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mepic_ray.hashing import KIND_PROMPT, block_hash, chunk_hash, namespace_fingerprint
from mepic_ray.segments import Chunk, PromptError, Text

PAYLOAD_KEY = "routing"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class RoutingInfo:
    """What the router ranks replicas by.

    ``chunks``: one ``(chunk_hash, tokens)`` pair per chunk of the prompt, in prompt
    order (a chunk given twice appears twice). ``prefix``: the chained hashes
    (``block_hash`` of ``KIND_PROMPT`` blocks, rooted at the model fingerprint) of the
    full blocks of prompt text before the first chunk. ``block_size``: tokens per
    prefix block (0 only when there is no prefix).

    Sequences given as lists are stored as tuples; anything else malformed raises
    ``TypeError`` or ``ValueError``.
    """
    chunks: tuple[tuple[str, int], ...] = ()
    prefix: tuple[str, ...] = ()
    block_size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.chunks, (str, bytes)) or not isinstance(self.chunks, Iterable):
            raise TypeError(f"chunks must be a sequence of (hash, tokens) pairs, got {type(self.chunks).__name__}")
        chunks = []
        for c in self.chunks:
            if isinstance(c, (str, bytes)) or not isinstance(c, Sequence) or len(c) != 2:
                raise TypeError(f"each chunk must be a (hash, tokens) pair, got {c!r}")
            h, n = c
            if not isinstance(h, str) or not h:
                raise TypeError(f"chunk hash must be a non-empty str, got {h!r}")
            if not _is_int(n):
                raise TypeError(f"chunk token count must be an int, got {n!r}")
            if n < 0:
                raise ValueError(f"chunk token count must be >= 0, got {n}")
            chunks.append((h, n))
        if isinstance(self.prefix, (str, bytes)) or not isinstance(self.prefix, Iterable):
            raise TypeError(f"prefix must be a sequence of block hashes, got {type(self.prefix).__name__}")
        prefix = tuple(self.prefix)
        if not all(isinstance(h, str) and h for h in prefix):
            raise TypeError("prefix block hashes must be non-empty str")
        if not _is_int(self.block_size):
            raise TypeError(f"block_size must be an int, got {self.block_size!r}")
        if self.block_size < 0 or (prefix and self.block_size == 0):
            raise ValueError(f"block_size must be positive when there is a prefix, got {self.block_size}")
        object.__setattr__(self, "chunks", tuple(chunks))
        object.__setattr__(self, "prefix", prefix)

    @property
    def chunk_hashes(self) -> tuple[str, ...]:
        return tuple(h for h, _ in self.chunks)


EMPTY = RoutingInfo()


class PublicChunk(Chunk):
    """A chunk of the public namespace: shared by every tenant, whoever sends it
    (payload form ``{"chunk": text, "public": true}``)."""


def prompt_items(items: Sequence[Any]) -> list:
    """The engine's prompt items (``str`` markup, ``Text``, ``Chunk``, ``PublicChunk``)
    from the payload's JSON form: ``str``, ``{"text": ...}``, ``{"chunk": ...}`` (with
    ``"public": true`` for a public chunk)."""
    out = []
    for x in items:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, Mapping) and len(x) == 1 and isinstance(x.get("text"), str):
            out.append(Text(x["text"]))
        elif isinstance(x, Mapping) and isinstance(x.get("chunk"), str) and \
                set(x) <= {"chunk", "public"} and isinstance(x.get("public", False), bool):
            out.append((PublicChunk if x.get("public") else Chunk)(x["chunk"]))
        else:
            raise PromptError(f"prompt items are str, {{'text': str}} or {{'chunk': str[, 'public': bool]}}, "
                              f"got {x!r:.80}")
    return out


def payload_items(items: Sequence[Any]) -> list:
    """The payload's JSON form of the engine's prompt items (``prompt_items`` reads it back)."""
    return [{"chunk": x.text, "public": True} if isinstance(x, PublicChunk) else {"chunk": x.text}
            if isinstance(x, Chunk) else {"text": x.text} if isinstance(x, Text) else x for x in items]


def tenant_layout(segments: list, prompt: Any, block_size: int, chunked: bool, model_fingerprint: str,
                  namespace: str | None = None):
    """The engine's ``build_layout`` of ``segments`` for a tenant: every block hash is
    chained from the namespace's root, and so is every chunk hash but a public one
    (``PublicChunk`` items of ``prompt``), which keeps the model's. The prompt blocks
    around a public chunk, and its first block recomputed in context, stay the
    tenant's: only the chunk's own pages are shared."""
    from dataclasses import replace
    from mepic_ray.core.layout import build_layout
    layout = build_layout(segments, block_size, chunked, namespace_fingerprint(model_fingerprint, namespace))
    if layout.fingerprint == model_fingerprint or not isinstance(prompt, (list, tuple)):
        return layout   # a str or Text prompt has no PublicChunk
    # Chunk spans follow the prompt's Chunk items in order (a trailing chunk is text).
    public = [isinstance(x, PublicChunk) for x in prompt if isinstance(x, Chunk)]
    layout.chunks = [replace(c, chunk_hash=chunk_hash(model_fingerprint, c.padded_ids[-c.num_tokens:], block_size))
                     if i < len(public) and public[i] else c for i, c in enumerate(layout.chunks)]
    return layout


def build_routing(items: Sequence[str | Mapping[str, str]], encode: Callable[[str], Sequence[int]],
                  fingerprint: str, block_size: int,
                  encode_text: Callable[[str], Sequence[int]] | None = None,
                  namespace: str | None = None) -> RoutingInfo:
    """The routing info of a prompt given as payload items (``str`` markup,
    ``{"text": ...}`` or ``{"chunk": ...}``), hashed in ``namespace`` (its public
    chunks in the model's), as ``tenant_layout`` hashes it for the engine.

    ``encode`` and ``encode_text`` turn markup, and user text and chunks, into token ids
    exactly as the engine tokenizes them (``encode_text`` defaults to ``encode``). Text
    items before the first chunk are tokenized one by one and concatenated; their full
    blocks make the prefix. Text after the first chunk is not part of it."""
    if not _is_int(block_size) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    chunks: list[tuple[str, int]] = []
    prefix_ids: list[int] = []
    encode_text = encode_text or encode
    root = namespace_fingerprint(fingerprint, namespace)
    for x in items:
        if isinstance(x, Mapping) and "chunk" in x:
            ids = list(encode_text(x["chunk"]))
            chunks.append((chunk_hash(fingerprint if x.get("public") is True else root, ids, block_size), len(ids)))
        elif isinstance(x, Mapping) and "text" in x:
            if not chunks:
                prefix_ids += encode_text(x["text"])
        elif isinstance(x, str):
            if not chunks:
                prefix_ids += encode(x)
        else:
            raise TypeError(f"prompt items are str, {{'text': ...}} or {{'chunk': ...}}, got {type(x).__name__}")
    prefix, h = [], root
    for i in range(0, len(prefix_ids) - block_size + 1, block_size):
        h = block_hash(h, KIND_PROMPT, prefix_ids[i:i + block_size])
        prefix.append(h)
    return RoutingInfo(tuple(chunks), tuple(prefix), block_size)


def routing_of(pending: Any) -> RoutingInfo:
    """The routing info of a Serve ``PendingRequest`` (its first argument is the
    payload dict). :data:`EMPTY` when there is none or it is not a ``RoutingInfo``:
    never raises, since an exception in the router hangs the request inside Ray."""
    try:
        args = getattr(pending, "args", None)
        if not args or not isinstance(args[0], Mapping):
            return EMPTY
        info = args[0].get(PAYLOAD_KEY)
        return info if isinstance(info, RoutingInfo) else EMPTY
    except Exception:
        return EMPTY
