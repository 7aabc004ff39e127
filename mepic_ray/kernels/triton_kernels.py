"""The Triton attention kernels over the paged NoPE pool: prefill (BLOCK_M query
rows of one sequence per program: one query head, or all heads of a KV head), the
one-pass key rotation that can feed it, and split-K decode (one query token, all
query heads of a KV head per program)."""
from __future__ import annotations

import triton
import triton.language as tl

from mepic_ray.kernels.triton_tiles import _attend_tile, _key_slots, _rotate

@triton.jit
def _rotate_keys_kernel(k_cache_ptr, out_ptr, cos_ptr, sin_ptr, inv_freq_ptr, seq_ptr, block_table_ptr, kv_pos_ptr,
                        n_slots, stride_cs, stride_ch, stride_bt, stride_kp, stride_rope, stride_os, stride_ot,
                        PAGE: tl.constexpr, HALF: tl.constexpr, TILE_N: tl.constexpr, ROPE_TABLE: tl.constexpr):
    """K of TILE_N logical slots of one prefilling sequence, rotated once at their
    positions into a contiguous scratch (the pool itself stays NoPE). The fused
    prefill kernel would otherwise rotate every key tile once per query tile and
    per query head; padding slots are left unwritten (the reader masks them)."""
    i = tl.program_id(0)
    start = tl.program_id(1) * TILE_N
    kv_head = tl.program_id(2)
    seq = tl.load(seq_ptr + i)
    dh = tl.arange(0, HALF)
    logical, slot, kpos, valid = _key_slots(seq, start, n_slots, block_table_ptr, kv_pos_ptr, stride_bt, stride_kp,
                                            PAGE, TILE_N)
    k_base = k_cache_ptr + slot[:, None] * stride_cs + kv_head * stride_ch
    k1 = tl.load(k_base + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    k2 = tl.load(k_base + HALF + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    k1, k2 = _rotate(k1, k2, tl.where(valid, kpos, 0), cos_ptr, sin_ptr, inv_freq_ptr, stride_rope, HALF, ROPE_TABLE)
    o_base = out_ptr + i * stride_os + logical.to(tl.int64)[:, None] * stride_ot + kv_head * (2 * HALF)
    tl.store(o_base + dh[None, :], k1.to(out_ptr.dtype.element_ty), mask=valid[:, None])
    tl.store(o_base + HALF + dh[None, :], k2.to(out_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _prefill_kernel(
        q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, inv_freq_ptr,
        q_pos_ptr, q_logical_ptr, tile_seq_ptr, tile_start_ptr, tile_end_ptr, tile_scratch_ptr,
        block_table_ptr, kv_pos_ptr, krot_ptr, qk_scale,
        stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, stride_kp, stride_rope, stride_krs, stride_kr,
        GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr, PAGE: tl.constexpr,
        HALF: tl.constexpr, TILE_N: tl.constexpr, USE_ROPE: tl.constexpr, ROPE_TABLE: tl.constexpr,
        IEEE: tl.constexpr, K_ROTATED: tl.constexpr, ROPE_RUNS: tl.constexpr):
    """BLOCK_M rows of one sequence: BLOCK_M // HEADS query tokens times HEADS query
    heads of one KV head (HEADS is 1, or GROUP to pack GQA: then every K/V tile is
    loaded and rotated once for all the query heads that read it, not once per head)."""
    tile = tl.program_id(0)
    head0 = tl.program_id(1) * HEADS
    kv_head = head0 // GROUP
    seq = tl.load(tile_seq_ptr + tile)
    krot_seq = krot_ptr + tl.load(tile_scratch_ptr + tile).to(tl.int64) * stride_krs
    r = tl.arange(0, BLOCK_M)
    # A tile holds BLOCK_M // HEADS tokens, so the spare rows past them fall beyond its end.
    tok = tl.load(tile_start_ptr + tile) + r // HEADS
    head = head0 + r % HEADS
    rmask = tok < tl.load(tile_end_ptr + tile)
    dh = tl.arange(0, HALF)
    q_base = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
    q1 = tl.load(q_base + dh[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_base + HALF + dh[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    q_logical = tl.load(q_logical_ptr + tok, mask=rmask, other=-1)
    if USE_ROPE:
        q1, q2 = _rotate(q1, q2, tl.load(q_pos_ptr + tok, mask=rmask, other=0), cos_ptr, sin_ptr,
                         inv_freq_ptr, stride_rope, HALF, ROPE_TABLE)
    q1 = q1 * qk_scale
    q2 = q2 * qk_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    end = tl.max(q_logical, axis=0) + 1
    for start in range(0, end, TILE_N):
        m_i, l_i, acc1, acc2 = _attend_tile(
            q1, q2, m_i, l_i, acc1, acc2, q_logical, seq, start, end, kv_head,
            k_cache_ptr, v_cache_ptr, block_table_ptr, kv_pos_ptr, cos_ptr, sin_ptr, inv_freq_ptr,
            stride_cs, stride_ch, stride_bt, stride_kp, stride_rope, krot_seq, stride_kr, PAGE, HALF, TILE_N,
            USE_ROPE, ROPE_TABLE, IEEE, K_ROTATED, ROPE_RUNS)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_base = out_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
    tl.store(o_base + dh[None, :], (acc1 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(o_base + HALF + dh[None, :], (acc2 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _decode_kernel(
        q_ptr, part_acc_ptr, part_ml_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, inv_freq_ptr,
        q_pos_ptr, q_logical_ptr, dec_seq_ptr, dec_row_ptr,
        block_table_ptr, kv_pos_ptr, qk_scale,
        stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, stride_kp, stride_rope,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr,
        TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_ROPE: tl.constexpr,
        ROPE_TABLE: tl.constexpr, IEEE: tl.constexpr, ROPE_RUNS: tl.constexpr):
    """One query token: all GROUP query heads of one KV head share each loaded
    (and rotated) K/V tile; the keys are split over NUM_SPLITS programs whose
    unnormalised partials are merged afterwards (split-K)."""
    d = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(dec_seq_ptr + d)
    row = tl.load(dec_row_ptr + d)
    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    dh = tl.arange(0, HALF)
    q_base = q_ptr + row * stride_qt + (kv_head * GROUP + g)[:, None] * stride_qh
    q1 = tl.load(q_base + dh[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_base + HALF + dh[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    last = tl.load(q_logical_ptr + row)
    if USE_ROPE:
        qpos = tl.zeros([GROUP_PAD], tl.int32) + tl.load(q_pos_ptr + row)
        q1, q2 = _rotate(q1, q2, qpos, cos_ptr, sin_ptr, inv_freq_ptr, stride_rope, HALF, ROPE_TABLE)
    q1 = q1 * qk_scale
    q2 = q2 * qk_scale
    q_logical = tl.zeros([GROUP_PAD], tl.int32) + last
    n_keys = last + 1
    per_split = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), TILE_N) * TILE_N
    s0 = split * per_split
    s1 = tl.minimum(s0 + per_split, n_keys)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc1 = tl.zeros([GROUP_PAD, HALF], tl.float32)
    acc2 = tl.zeros([GROUP_PAD, HALF], tl.float32)
    for start in range(s0, s1, TILE_N):
        m_i, l_i, acc1, acc2 = _attend_tile(
            q1, q2, m_i, l_i, acc1, acc2, q_logical, seq, start, s1, kv_head,
            k_cache_ptr, v_cache_ptr, block_table_ptr, kv_pos_ptr, cos_ptr, sin_ptr, inv_freq_ptr,
            stride_cs, stride_ch, stride_bt, stride_kp, stride_rope, k_cache_ptr, 0, PAGE, HALF, TILE_N,
            USE_ROPE, ROPE_TABLE, IEEE, False, ROPE_RUNS)
    # partials laid out [dec, kv_head, split, GROUP_PAD, 2 * HALF] and [..., 2] (m, l)
    base = ((d * tl.num_programs(1) + kv_head) * NUM_SPLITS + split) * GROUP_PAD + g
    tl.store(part_acc_ptr + base[:, None] * (2 * HALF) + dh[None, :], acc1)
    tl.store(part_acc_ptr + base[:, None] * (2 * HALF) + HALF + dh[None, :], acc2)
    tl.store(part_ml_ptr + base * 2, m_i)
    tl.store(part_ml_ptr + base * 2 + 1, l_i)
