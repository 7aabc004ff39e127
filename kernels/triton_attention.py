"""Triton fused-RoPE paged attention over the NoPE KV pool (and the KV write).

Same contract as ``attention_ref``: K is stored without RoPE; each loaded K page
is rotated in registers from the slot position map of *this* request, padding
slots (position -1) are masked and their V is zeroed so garbage never leaks,
and causality is by logical slot index. One program handles BLOCK_M query rows
of one sequence for one query head and walks the sequence's pages with an
online softmax. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


@triton.jit
def _paged_rope_attn_kernel(
        q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr,
        q_pos_ptr, q_logical_ptr, tile_seq_ptr, tile_start_ptr, tile_end_ptr,
        block_table_ptr, kv_pos_ptr, scale,
        stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, stride_kp, stride_rope,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr,
        USE_ROPE: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_start_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    dh = tl.arange(0, HALF)

    q_base = q_ptr + rows[:, None] * stride_qt + head * stride_qh
    q1 = tl.load(q_base + dh[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_base + HALF + dh[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    q_logical = tl.load(q_logical_ptr + rows, mask=rmask, other=-1)
    if USE_ROPE:
        qp = tl.load(q_pos_ptr + rows, mask=rmask, other=0)
        qc = tl.load(cos_ptr + qp[:, None] * stride_rope + dh[None, :])
        qs = tl.load(sin_ptr + qp[:, None] * stride_rope + dh[None, :])
        q1r = q1 * qc - q2 * qs
        q2 = q2 * qc + q1 * qs
        q1 = q1r
    q1 = q1 * scale
    q2 = q2 * scale

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    last = tl.max(q_logical, axis=0)
    n_pages = last // PAGE + 1
    offs_n = tl.arange(0, PAGE)
    for p in range(0, n_pages):
        phys = tl.load(block_table_ptr + seq * stride_bt + p)
        logical = p * PAGE + offs_n
        kpos = tl.load(kv_pos_ptr + seq * stride_kp + logical)
        valid = (kpos >= 0) & (logical <= last)
        slot = phys * PAGE + offs_n
        k_base = k_cache_ptr + slot[:, None] * stride_cs + kv_head * stride_ch
        k1 = tl.load(k_base + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(k_base + HALF + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if USE_ROPE:
            kp = tl.where(valid, kpos, 0)
            kc = tl.load(cos_ptr + kp[:, None] * stride_rope + dh[None, :])
            ks = tl.load(sin_ptr + kp[:, None] * stride_rope + dh[None, :])
            k1r = k1 * kc - k2 * ks
            k2 = k2 * kc + k1 * ks
            k1 = k1r
        if IEEE:
            s = tl.dot(q1, tl.trans(k1), input_precision="ieee") + tl.dot(q2, tl.trans(k2), input_precision="ieee")
        else:
            s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
        allowed = valid[None, :] & (logical[None, :] <= q_logical[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        pr = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v_base = v_cache_ptr + slot[:, None] * stride_cs + kv_head * stride_ch
        v1 = tl.load(v_base + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        v2 = tl.load(v_base + HALF + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        if IEEE:
            acc1 = acc1 * alpha[:, None] + tl.dot(pr, v1, input_precision="ieee")
            acc2 = acc2 * alpha[:, None] + tl.dot(pr, v2, input_precision="ieee")
        else:
            acc1 = acc1 * alpha[:, None] + tl.dot(pr.to(v_cache_ptr.dtype.element_ty), v1.to(v_cache_ptr.dtype.element_ty))
            acc2 = acc2 * alpha[:, None] + tl.dot(pr.to(v_cache_ptr.dtype.element_ty), v2.to(v_cache_ptr.dtype.element_ty))
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_base = out_ptr + rows[:, None] * stride_qt + head * stride_qh
    tl.store(o_base + dh[None, :], (acc1 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(o_base + HALF + dh[None, :], (acc2 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def paged_attention_triton(q: torch.Tensor, q_pos: torch.Tensor, q_logical: torch.Tensor,
                           cu_q: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_pos: torch.Tensor, page: int,
                           cos_half: torch.Tensor, sin_half: torch.Tensor, scale: float,
                           use_rope: bool = True, block_m: int = 16) -> torch.Tensor:
    """q: [tokens, heads, head_dim] NoPE queries, rows of sequence i in cu_q[i]:cu_q[i+1];
    block_tables: [seqs, max_pages] int32; kv_pos: [seqs, max_pages * page] int32
    (-1: padding or beyond the sequence); cos_half/sin_half: [max_pos, head_dim/2]."""
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    tiles_seq, tiles_start, tiles_end = [], [], []
    for i in range(len(cu_q) - 1):
        for r in range(cu_q[i], cu_q[i + 1], block_m):
            tiles_seq.append(i)
            tiles_start.append(r)
            tiles_end.append(min(r + block_m, cu_q[i + 1]))
    out = torch.empty_like(q)
    if not tiles_seq:
        return out
    dev = q.device
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)
    q = q.contiguous()
    cos_half, sin_half = cos_half.contiguous(), sin_half.contiguous()
    _paged_rope_attn_kernel[(len(tiles_seq), h)](
        q, out, k_cache, v_cache, cos_half, sin_half,
        q_pos.to(torch.int32).contiguous(), q_logical.to(torch.int32).contiguous(),
        as_i32(tiles_seq), as_i32(tiles_start), as_i32(tiles_end),
        block_tables.to(torch.int32).contiguous(), kv_pos.to(torch.int32).contiguous(), scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.shape[1], kv_pos.shape[1], cos_half.stride(0),
        GROUP=h // kvh, BLOCK_M=block_m, PAGE=page, HALF=d // 2,
        USE_ROPE=use_rope, IEEE=q.dtype == torch.float32)
    return out
