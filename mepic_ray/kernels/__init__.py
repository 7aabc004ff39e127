"""Attention kernels over the paged KV pool.

The pool stores each key rotated at the position it was stored at (a chunk's keys at
their chunk-local positions, so a chunk's pages are the same bytes in every request);
attention turns queries (or, where they must be, keys) by each key's offset in the
current request. ``attention_ref`` is the torch reference (the oracle for the
cascade path and the Triton kernels).
"""
from mepic_ray.kernels.rope import RopeTable, apply_rope, rope_inv_freq
from mepic_ray.kernels.attention_ref import PagedSeq, build_paged_seq, paged_attention_ref, write_kv

__all__ = [
    "RopeTable", "apply_rope", "rope_inv_freq",
    "PagedSeq", "build_paged_seq", "paged_attention_ref", "write_kv",
]
