"""Attention backends the model calls per layer: the torch reference (CPU) and
the Triton fused-RoPE kernels (CUDA, or CPU under TRITON_INTERPRET=1).

Both take NoPE queries, rotate the step's new keys at their stored positions before
they are written (``rotate_keys``), and turn queries or keys inside attention by
each key's offset (``mepic_ray.kernels.attention_ref``), so the model code is the same for either."""
from __future__ import annotations

import os

import torch

from mepic_ray.kernels import RopeTable, apply_rope, write_kv
from mepic_ray.kernels.cascade import cascade_attention
from mepic_ray.worker.cascade_plan import build_cascade

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: str, head_dim: int, block_size: int) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        fits = head_dim >= 32 and block_size >= 16
        return "triton" if str(device).startswith("cuda") and fits else "torch"
    if name == "triton" and not str(device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton backend on CPU needs TRITON_INTERPRET=1 (slow; for tests)")
    if name == "triton" and (head_dim < 32 or block_size < 16):
        raise ValueError(f"the Triton kernels need head_dim >= 32 and block_size >= 16 "
                         f"(tile sizes of tl.dot), got {head_dim} and {block_size}")
    return name


class KeyRotation:
    """The step's new keys, rotated at the positions the pool stores them at."""

    def __init__(self, rope: RopeTable, rows_stored: torch.Tensor):
        self.k_cos, self.k_sin = rope.lookup(rows_stored)

    def rotate_keys(self, k: torch.Tensor) -> torch.Tensor:
        return apply_rope(k, self.k_cos, self.k_sin)


class TorchAttention(KeyRotation):
    """Cascade attention (``mepic_ray.kernels.cascade``): chunk pages several rows read are read once."""

    def __init__(self, plan: tuple, q_cos: torch.Tensor, q_sin: torch.Tensor, scale: float,
                 rope: RopeTable, rows_stored: torch.Tensor):
        super().__init__(rope, rows_stored)
        self.plan, self.q_cos, self.q_sin, self.scale = plan, q_cos, q_sin, scale

    @staticmethod
    def build(specs, offsets, rows_pos, rows_stored, rows_logical, block_size: int, rope: RopeTable,
              scale: float, device):
        plan = build_cascade(specs, offsets, rows_pos, rows_logical, block_size, rope, device)
        q_cos, q_sin = rope.lookup(rows_pos)
        return TorchAttention(plan, q_cos, q_sin, scale, rope, rows_stored)

    def write(self, k_cache, v_cache, k, v, slots) -> None:
        write_kv(k_cache, v_cache, k, v, slots)

    def __call__(self, q, k_cache, v_cache) -> torch.Tensor:
        return cascade_attention(q, self.q_cos, self.q_sin, k_cache, v_cache, *self.plan, self.scale)


class TritonAttention(KeyRotation):
    def __init__(self, q_pos, q_logical, cu_q: list[int], block_tables, kv_offsets, cos_half, sin_half,
                 page: int, scale: float, rope: RopeTable, rows_stored: torch.Tensor, options: dict | None = None):
        super().__init__(rope, rows_stored)
        self.q_pos, self.q_logical, self.cu_q = q_pos, q_logical, cu_q
        self.block_tables, self.kv_offsets = block_tables, kv_offsets
        self.cos_half, self.sin_half, self.page, self.scale = cos_half, sin_half, page, scale
        self.options = options or {}     # extra keywords of paged_attention_triton

    @staticmethod
    def build(specs, offsets, rows_pos, rows_stored, rows_logical, block_size: int, rope: RopeTable,
              scale: float, device, options: dict | None = None):
        max_pages = max(len(s.block_table) for s in specs)
        bt = torch.zeros(len(specs), max_pages, dtype=torch.int32)
        kv_offsets = torch.full((len(specs), max_pages * block_size), -1, dtype=torch.int32)
        cu = [0]
        for i, (s, off, ql) in enumerate(zip(specs, offsets, rows_logical)):
            bt[i, :len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
            kv_offsets[i, :off.numel()] = off.to(torch.int32)
            cu.append(cu[-1] + ql.numel())
        rope.ensure(max(int(kv_offsets.max()), int(rows_pos.max())) + 1)
        half = rope.cos.shape[1] // 2
        return TritonAttention(rows_pos, torch.cat(rows_logical), cu, bt.to(device), kv_offsets.to(device),
                               rope.cos[:, :half].contiguous(), rope.sin[:, :half].contiguous(), block_size, scale,
                               rope, rows_stored, options)

    def write(self, k_cache, v_cache, k, v, slots) -> None:
        from mepic_ray.kernels.triton_attention import write_kv_triton
        write_kv_triton(k_cache, v_cache, k, v, slots)

    def __call__(self, q, k_cache, v_cache) -> torch.Tensor:
        from mepic_ray.kernels.triton_attention import paged_attention_triton
        return paged_attention_triton(q, self.q_pos, self.q_logical, self.cu_q, k_cache, v_cache,
                                      self.block_tables, self.kv_offsets, self.page, self.cos_half,
                                      self.sin_half, self.scale, **self.options)
