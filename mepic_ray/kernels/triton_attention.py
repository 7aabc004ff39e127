"""Triton fused-RoPE paged attention over the NoPE KV pool (and the KV write).

Same contract as ``attention_ref``: K is stored without RoPE; each loaded K page
is rotated in registers from the slot position map of *this* request, padding
slots (position -1) are masked and their V is zeroed so garbage never leaks,
and causality is by logical slot index. This module is the host side: it
splits a batch into prefilling and decoding sequences, picks tile sizes and
splits, and launches the kernels of ``triton_kernels``. Runs on CUDA, or on CPU
tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mepic_ray.kernels.triton_kernels import _decode_kernel, _prefill_kernel, _rotate_keys_kernel


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, row_stride, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    offs = tl.arange(0, BLOCK)
    # A row is kv_heads * head_dim wide (192 for SmolLM2): pad the range to a power of two.
    m = offs < row_stride
    if slot >= 0:
        tl.store(kc_ptr + slot * row_stride + offs, tl.load(k_ptr + t * row_stride + offs, mask=m), mask=m)
        tl.store(vc_ptr + slot * row_stride + offs, tl.load(v_ptr + t * row_stride + offs, mask=m), mask=m)


def write_kv_triton(k_cache, v_cache, k, v, slot_mapping):
    """k_cache/v_cache: [num_slots, kv_heads, head_dim]; k/v: [tokens, kv_heads, head_dim]."""
    t = k.shape[0]
    if t == 0:
        return
    row = k.shape[1] * k.shape[2]
    _write_kv_kernel[(t,)](k.contiguous().to(k_cache.dtype), v.contiguous().to(v_cache.dtype),
                           k_cache, v_cache, slot_mapping.to(torch.int32).contiguous(), row,
                           BLOCK=triton.next_power_of_2(row))



def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def paged_attention_triton(q: torch.Tensor, q_pos: torch.Tensor, q_logical: torch.Tensor,
                           cu_q: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_pos: torch.Tensor, page: int,
                           cos_half: torch.Tensor, sin_half: torch.Tensor, scale: float,
                           use_rope: bool = True, inv_freq: torch.Tensor | None = None,
                           block_m: int = 64, tile_n: int = 64, num_splits: int | None = None,
                           decode_tile_n: int = 32, decode_warps: int = 4,
                           prefill_warps: int = 4, prefill_stages: int | None = None,
                           rotate_keys_once: bool = False, rope_runs: bool = False,
                           pack_gqa: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [tokens, heads, head_dim] NoPE queries, rows of sequence i in cu_q[i]:cu_q[i+1];
    block_tables: [seqs, max_pages] int32; kv_pos: [seqs, max_pages * page] int32
    (-1: padding or beyond the sequence); cos_half/sin_half: [max_pos, head_dim/2].
    With ``inv_freq`` [head_dim/2] the rotation is computed in-kernel instead of read
    from the tables. Sequences with one query row take the split-K decode kernel.
    With ``rotate_keys_once`` the prefilling sequences' keys are first rotated into a
    scratch buffer (one pass), and the prefill kernel reads them from there. With
    ``rope_runs`` a key tile whose positions are one run turns K by the table's first
    rows and Q by the run's start (see ``_attend_tile``); the angles then add in fp32,
    which differs from the direct table row by an ulp of the angle. With ``pack_gqa``
    a prefill program takes all query heads of one KV head (``block_m`` rows are then
    ``block_m // group`` tokens times the group), so each K/V tile is loaded and
    rotated once per group rather than once per query head. ``out``
    (shaped like q) receives the result in place of a new tensor."""
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    group = h // kvh
    dev = q.device
    # The kernels write out with q's strides: both must be contiguous.
    q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if t == 0:
        return out
    q_pos = q_pos.to(torch.int32).contiguous()
    q_logical = q_logical.to(torch.int32).contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    kv_pos = kv_pos.to(torch.int32).contiguous()
    cos_half, sin_half = cos_half.contiguous(), sin_half.contiguous()
    rope_table = inv_freq is None
    # With tables the kernel never reads inv_freq; any float tensor fills the slot.
    inv_freq = (inv_freq if inv_freq is not None else cos_half[0]).float().contiguous()
    fit = lambda n: max(16, min(n, triton.next_power_of_2(kv_pos.shape[1])))
    widest_tile = max(fit(tile_n), fit(decode_tile_n))
    if rope_runs and rope_table and cos_half.shape[0] < widest_tile:
        raise ValueError(f"rope_runs reads the first {widest_tile} rows of the RoPE table, "
                         f"which has {cos_half.shape[0]}")
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)
    qk_scale = scale * 1.4426950408889634     # log2(e): the kernels' softmax runs in base 2
    # A CPU tensor here means the interpreter (see _dot).
    ieee = q.dtype == torch.float32 or (dev.type == "cpu" and v_cache.dtype == torch.bfloat16)
    common = dict(PAGE=page, HALF=d // 2, USE_ROPE=use_rope, ROPE_TABLE=rope_table, IEEE=ieee, ROPE_RUNS=rope_runs)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
               block_tables.stride(0), kv_pos.stride(0), cos_half.stride(0))
    decode = [i for i in range(len(cu_q) - 1) if cu_q[i + 1] - cu_q[i] == 1]
    prefill = [i for i in range(len(cu_q) - 1) if cu_q[i + 1] - cu_q[i] > 1]
    if prefill:
        heads = group if pack_gqa else 1
        longest = max(cu_q[i + 1] - cu_q[i] for i in prefill)
        bm = max(16, triton.next_power_of_2(heads), min(block_m, triton.next_power_of_2(longest * heads)))
        tokens = bm // heads
        tiles = [(i, r, min(r + tokens, cu_q[i + 1])) for i in prefill for r in range(cu_q[i], cu_q[i + 1], tokens)]
        seqs, starts, ends = zip(*tiles)
        k_rotated = rotate_keys_once and use_rope
        n_slots = kv_pos.shape[1]
        if k_rotated:
            krot = torch.empty(len(prefill), n_slots, kvh, d, dtype=k_cache.dtype, device=dev)
            rot_tile = fit(tile_n)
            _rotate_keys_kernel[(len(prefill), triton.cdiv(n_slots, rot_tile), kvh)](
                k_cache, krot, cos_half, sin_half, inv_freq, as_i32(prefill), block_tables, kv_pos, n_slots,
                k_cache.stride(0), k_cache.stride(1), block_tables.stride(0), kv_pos.stride(0), cos_half.stride(0),
                krot.stride(0), krot.stride(1), PAGE=page, HALF=d // 2, TILE_N=rot_tile, ROPE_TABLE=rope_table)
        else:
            krot = k_cache    # never read
        scratch_row = {s_: j for j, s_ in enumerate(prefill)}
        _prefill_kernel[(len(tiles), h // heads)](
            q, out, k_cache, v_cache, cos_half, sin_half, inv_freq, q_pos, q_logical,
            as_i32(seqs), as_i32(starts), as_i32(ends), as_i32([scratch_row[s_] for s_ in seqs]),
            block_tables, kv_pos, krot, qk_scale, *strides,
            krot.stride(0) if k_rotated else 0, krot.stride(1) if k_rotated else 0,
            GROUP=group, HEADS=heads, BLOCK_M=bm, TILE_N=fit(tile_n), K_ROTATED=k_rotated, num_warps=prefill_warps,
            **({} if prefill_stages is None else {"num_stages": prefill_stages}), **common)
    if decode:
        n = len(decode)
        tile = fit(decode_tile_n)
        if num_splits is None:
            # Enough programs to cover the SMs four times (measured best on an H100 at
            # 32k context), but no split shorter than 4 tiles.
            num_splits = max(1, min(4 * _num_sms(dev) // (n * kvh), kv_pos.shape[1] // (4 * tile)))
        num_splits = min(triton.next_power_of_2(num_splits), 64)
        gpad = max(16, triton.next_power_of_2(group))
        part_acc = torch.empty(n, kvh, num_splits, gpad, d, dtype=torch.float32, device=dev)
        part_ml = torch.empty(n, kvh, num_splits, gpad, 2, dtype=torch.float32, device=dev)
        rows = as_i32([cu_q[i] for i in decode])
        _decode_kernel[(n, kvh, num_splits)](
            q, part_acc, part_ml, k_cache, v_cache, cos_half, sin_half, inv_freq, q_pos, q_logical,
            as_i32(decode), rows, block_tables, kv_pos, qk_scale, *strides,
            GROUP=group, GROUP_PAD=gpad, NUM_SPLITS=num_splits, TILE_N=tile, num_warps=decode_warps, **common)
        m, l = part_ml[..., 0], part_ml[..., 1]
        m_max = m.amax(dim=2, keepdim=True)
        w = torch.exp2(m - torch.where(torch.isinf(m_max), 0.0, m_max))      # base 2; empty splits weigh 0
        acc = (part_acc * w[..., None]).sum(2) / (l * w).sum(2)[..., None]     # [n, kvh, gpad, d]
        out[rows.long()] = acc[:, :, :group].reshape(n, h, d).to(out.dtype)
    return out
