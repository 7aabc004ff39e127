"""Attention kernels over the paged NoPE KV pool.

RoPE is applied inside attention from each slot's position in the current
request, so cached K never carries a position. ``attention_ref`` is the torch
reference (the CPU path and the oracle for the Triton kernels).
"""
from kernels.rope import RopeTable, apply_rope, rope_inv_freq
from kernels.attention_ref import PagedSeq, build_paged_seq, paged_attention_ref, write_kv

__all__ = [
    "RopeTable", "apply_rope", "rope_inv_freq",
    "PagedSeq", "build_paged_seq", "paged_attention_ref", "write_kv",
]
