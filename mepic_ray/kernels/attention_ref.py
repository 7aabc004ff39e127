"""Torch reference for paged attention over a pool of keys stored rotated.

The pool holds each key rotated at the position it was *stored* at: a chunk's keys
at their chunk-local positions (what compiling the chunk alone gives, so its pages
are the same bytes wherever a request puts it), every other key at its position in
the request that wrote it. A sequence is described by its block table (logical
block -> physical block) and an offset map over its logical slots: how far this
request's position of the slot lies past the position its key is stored at (0 for
the request's own text, the chunk's start for a chunk's slots), or -1 for padding.
Since R(p)ᵀR(o + c) = R(p − o)ᵀR(c), a key stored at c and turned by its offset o
scores against a query at p as the key at o + c would. Causality is by logical slot
index, not by position, because padding slots take an index but no position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mepic_ray.kernels.rope import RopeTable, apply_rope


@dataclass
class PagedSeq:
    """Per-step attention metadata of one sequence, reused by every layer."""
    q_start: int
    q_end: int
    kv_slots: torch.Tensor   # [L] physical slot of each logical slot
    kv_cos: torch.Tensor     # [L, head_dim] at each slot's offset
    kv_sin: torch.Tensor     # [L, head_dim]
    mask: torch.Tensor       # [q_len, L] True where the query may attend


def build_paged_seq(q_start: int, q_logical: torch.Tensor, block_table: torch.Tensor,
                    kv_offsets: torch.Tensor, block_size: int, rope: RopeTable) -> PagedSeq:
    # Padding slots are dropped from the gather, not just masked: their pages may
    # hold anything (even NaN), and 0 * NaN would still poison the output.
    logical = torch.nonzero(kv_offsets >= 0).flatten()
    kv_slots = block_table[logical // block_size] * block_size + logical % block_size
    cos, sin = rope.lookup(kv_offsets[logical])
    mask = logical[None, :] <= q_logical[:, None]
    return PagedSeq(q_start, q_start + q_logical.shape[0], kv_slots, cos, sin, mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store K (rotated at its stored positions) and V [tokens, kv_heads, head_dim] into
    flat slot caches [num_slots, kv_heads, head_dim]; slots < 0 are skipped."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        seqs: list[PagedSeq], scale: float) -> torch.Tensor:
    """q: [tokens, heads, head_dim], already rotated to its positions.
    K is gathered from the pool and turned here by each slot's offset."""
    out = torch.empty_like(q)
    for s in seqs:
        k = apply_rope(k_cache[s.kv_slots].to(q.dtype), s.kv_cos, s.kv_sin)
        v = v_cache[s.kv_slots].to(q.dtype)
        qs = q[s.q_start:s.q_end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qs, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=s.mask, scale=scale, enable_gqa=True)
        out[s.q_start:s.q_end] = o[0].transpose(0, 1)
    return out
