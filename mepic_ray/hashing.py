"""Content hashes for chunks and prefix blocks.

This module must stay importable without torch: the router imports it to hash
the chunks of a request before any replica sees it, and both sides must agree
bit for bit. xxh3 with a fixed seed gives the same value in every process and
on every machine, unlike Python's salted ``hash()``.
"""
from __future__ import annotations

import operator
import struct
from typing import Iterable, Sequence

import xxhash

# Fixed so that hashes are stable across processes, hosts and releases.
HASH_SEED = 0x4D455049  # "MEPI"
PAD_TOKEN = -1  # a padding slot: never attended, part of a chunk's identity

# Block kinds enter the prefix chain so that a block whose tokens happen to
# equal another block's tokens but whose KV was produced differently (a
# standalone chunk block vs an in-context prompt block) never aliases it.
KIND_PROMPT = 1
KIND_CHUNK_FIRST = 2
KIND_CHUNK_SHARED = 3

# Chunks registered or marked as public hash under the bare model fingerprint, so every
# tenant (and a service without tenants) shares them; no tenant may take this name.
PUBLIC_NAMESPACE = "public"


_PACKERS: dict[int, object] = {}  # length -> struct.Struct(f"<{n}q").pack; lengths are block multiples


def _token_bytes(token_ids: Iterable[int]) -> bytes:
    """Token ids as little-endian signed 64-bit integers, whatever the host's byte order.

    ``"<"`` fixes both the byte order and the 8-byte standard size, so the bytes
    (and every hash over them) equal what ``array("q", ids).tobytes()`` gave on
    little-endian hosts, and a big-endian host now agrees with them. A compiled
    ``struct.Struct`` per length is the fastest stdlib encoder here (hot path).
    """
    if type(token_ids) is not list and type(token_ids) is not tuple:
        token_ids = list(token_ids)
    n = len(token_ids)
    pack = _PACKERS.get(n)
    if pack is None:
        pack = struct.Struct(f"<{n}q").pack
        if len(_PACKERS) < 4096:
            _PACKERS[n] = pack
    try:
        return pack(*token_ids)
    except struct.error:  # raise what array("q", ids) raised before
        for i in token_ids:
            operator.index(i)  # TypeError for a non-integer id
        raise OverflowError("token id out of int64 range") from None


def pad_front(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Front-pad a chunk so it ends on a block boundary (MEPIC's layout)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    pad = (-len(token_ids)) % block_size
    return [PAD_TOKEN] * pad + list(token_ids)


def chunk_hash(model_fingerprint: str, token_ids: Sequence[int], block_size: int) -> str:
    """Identity of a chunk: its padded tokens under one model, at any position."""
    h = xxhash.xxh3_128(seed=HASH_SEED)
    h.update(model_fingerprint.encode())
    h.update(block_size.to_bytes(4, "little"))
    h.update(_token_bytes(pad_front(token_ids, block_size)))
    return h.hexdigest()


def block_hash(parent: str | None, kind: int, token_ids: Sequence[int]) -> str:
    """Prefix-chained hash of one block (vLLM style: parent, kind, tokens)."""
    h = xxhash.xxh3_128(seed=HASH_SEED)
    h.update((parent or "root").encode())
    h.update(kind.to_bytes(1, "little"))
    h.update(_token_bytes(token_ids))
    return h.hexdigest()


def namespace_fingerprint(model_fingerprint: str, namespace: str | None) -> str:
    """The root of a tenant's chunk hashes and prefix-block chains (vLLM's per-request
    ``cache_salt``, CVE-2025-46570): no hash of one namespace equals one of another, so
    one tenant's KV can never be found, reused or timed by another. ``None`` (no tenants)
    and the public namespace keep the model fingerprint itself."""
    if namespace is None or namespace == PUBLIC_NAMESPACE:
        return model_fingerprint
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"a namespace is a non-empty str, got {namespace!r}")
    h = xxhash.xxh3_128(seed=HASH_SEED)
    # Length-prefixed, and tagged apart from every other hash input in this module.
    for part in (b"mepic-namespace", model_fingerprint.encode(), namespace.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def fingerprint_bytes(*parts: bytes) -> str:
    """Stable digest of model identity material (config text, weight bytes)."""
    h = xxhash.xxh3_128(seed=HASH_SEED)
    for p in parts:
        h.update(p)
    return h.hexdigest()
