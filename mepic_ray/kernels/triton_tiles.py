"""Device helpers shared by the Triton attention kernels: RoPE from the cos/sin
table (or in-kernel from inv_freq), the gather of one tile of key slots through
the block table, and one online-softmax step over such a tile."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _cos_sin(pos, cos_ptr, sin_ptr, inv_freq_ptr, stride_rope, HALF: tl.constexpr, ROPE_TABLE: tl.constexpr):
    """cos/sin [n, HALF] at positions ``pos`` [n]: read from the table, or computed
    in-kernel from inv_freq (no table traffic, more arithmetic)."""
    dh = tl.arange(0, HALF)
    if ROPE_TABLE:
        c = tl.load(cos_ptr + pos[:, None] * stride_rope + dh[None, :])
        s = tl.load(sin_ptr + pos[:, None] * stride_rope + dh[None, :])
    else:
        ang = pos[:, None].to(tl.float32) * tl.load(inv_freq_ptr + dh)[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang)
    return c, s


@triton.jit
def _rotate(x1, x2, pos, cos_ptr, sin_ptr, inv_freq_ptr, stride_rope, HALF: tl.constexpr,
            ROPE_TABLE: tl.constexpr):
    """Rotate-half RoPE of rows [n, HALF] x 2 at positions ``pos`` [n]."""
    c, s = _cos_sin(pos, cos_ptr, sin_ptr, inv_freq_ptr, stride_rope, HALF, ROPE_TABLE)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _key_slots(seq, start, end, block_table_ptr, kv_pos_ptr, stride_bt, stride_kp, PAGE: tl.constexpr,
               TILE_N: tl.constexpr):
    """Logical key slots [start, start + TILE_N) of one sequence: their slot in the pool
    (through the block table), their position, and whether they hold a real token
    (below ``end`` and not padding)."""
    logical = start + tl.arange(0, TILE_N)
    inb = logical < end
    phys = tl.load(block_table_ptr + seq * stride_bt + logical // PAGE, mask=inb, other=0)
    kpos = tl.load(kv_pos_ptr + seq * stride_kp + logical, mask=inb, other=-1)
    return logical, (phys * PAGE + logical % PAGE).to(tl.int64), kpos, inb & (kpos >= 0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
    """fp32 operands of a dot rounded to the KV dtype, accumulated in fp32. IEEE does the
    same in exact fp32 arithmetic after the rounding: the fp32 kernels, and bf16 under
    the interpreter, whose bf16 ``tl.dot`` multiplies raw bit patterns."""
    if IEEE:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _attend_tile(q1, q2, m_i, l_i, acc1, acc2, q_logical, seq, start, end, kv_head,
                 k_cache_ptr, v_cache_ptr, block_table_ptr, kv_pos_ptr, cos_ptr, sin_ptr, inv_freq_ptr,
                 stride_cs, stride_ch, stride_bt, stride_kp, stride_rope, krot_ptr, stride_kr,
                 PAGE: tl.constexpr, HALF: tl.constexpr, TILE_N: tl.constexpr, USE_ROPE: tl.constexpr,
                 ROPE_TABLE: tl.constexpr, IEEE: tl.constexpr, K_ROTATED: tl.constexpr,
                 ROPE_RUNS: tl.constexpr):
    """One online-softmax step over logical key slots [start, start + TILE_N) (< end),
    gathered page by page from the block table; padding slots masked, V zeroed.
    Scores are in base 2 (Q comes scaled by log2(e) / sqrt(d)): exp2 is the GPU's
    native exponential, exp costs a multiply more per score.
    With K_ROTATED, K comes already rotated from this sequence's scratch rows
    (``krot_ptr`` points at them: [logical slots, kv_heads, 2 * HALF], rows ``stride_kr`` apart).
    With ROPE_RUNS, a tile whose real keys sit at positions c + j (j: index in the tile)
    takes R(c + j) = R(c) R(j): K turns by the first TILE_N table rows, which stay in
    L1, and Q by -c once per tile, instead of each tile reading TILE_N scattered rows
    of the table (as many bytes as its K and V in fp32). Chunk pages and prompt pages
    are such runs; a tile across a jump in positions takes the general path."""
    DT: tl.constexpr = v_cache_ptr.dtype.element_ty
    dh = tl.arange(0, HALF)
    logical, slot, kpos, valid = _key_slots(seq, start, end, block_table_ptr, kv_pos_ptr, stride_bt, stride_kp,
                                            PAGE, TILE_N)
    if K_ROTATED:
        k_base = krot_ptr + logical.to(tl.int64)[:, None] * stride_kr + kv_head * (2 * HALF)
    else:
        k_base = k_cache_ptr + slot[:, None] * stride_cs + kv_head * stride_ch
    k1 = tl.load(k_base + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    k2 = tl.load(k_base + HALF + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    qk1, qk2 = q1, q2
    if USE_ROPE and not K_ROTATED:
        k_rope_pos = tl.where(valid, kpos, 0)
        if ROPE_RUNS:
            j = tl.arange(0, TILE_N)
            lo = tl.min(tl.where(valid, kpos - j, 1 << 30), axis=0)
            hi = tl.max(tl.where(valid, kpos - j, -(1 << 30)), axis=0)
            if lo == hi:
                k_rope_pos = tl.where(valid, j, 0)
                c, sn = _cos_sin(tl.zeros([1], tl.int32) + tl.abs(lo), cos_ptr, sin_ptr, inv_freq_ptr,
                                 stride_rope, HALF, ROPE_TABLE)
                sn = tl.where(lo >= 0, -sn, sn)     # R(-lo): sin is odd, the table holds |lo|
                qk1 = q1 * c - q2 * sn
                qk2 = q2 * c + q1 * sn
        k1, k2 = _rotate(k1, k2, k_rope_pos, cos_ptr, sin_ptr, inv_freq_ptr, stride_rope, HALF, ROPE_TABLE)
    s = _dot(qk1, tl.trans(k1), IEEE, DT) + _dot(qk2, tl.trans(k2), IEEE, DT)
    allowed = valid[None, :] & (logical[None, :] <= q_logical[:, None])
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_base = v_cache_ptr + slot[:, None] * stride_cs + kv_head * stride_ch
    v1 = tl.load(v_base + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    v2 = tl.load(v_base + HALF + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    acc1 = acc1 * alpha[:, None] + _dot(p, v1, IEEE, DT)
    acc2 = acc2 * alpha[:, None] + _dot(p, v2, IEEE, DT)
    return m_new, l_i, acc1, acc2
