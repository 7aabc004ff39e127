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
def _rotate(x1, x2, pos, cos_ptr, sin_ptr, inv_freq_ptr, stride_rope, HALF: tl.constexpr,
            ROPE_TABLE: tl.constexpr):
    """Rotate-half RoPE of rows [n, HALF] x 2 at positions ``pos`` [n]: from the
    cos/sin table, or computed in-kernel from inv_freq (no table traffic)."""
    dh = tl.arange(0, HALF)
    if ROPE_TABLE:
        c = tl.load(cos_ptr + pos[:, None] * stride_rope + dh[None, :])
        s = tl.load(sin_ptr + pos[:, None] * stride_rope + dh[None, :])
    else:
        ang = pos[:, None].to(tl.float32) * tl.load(inv_freq_ptr + dh)[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang)
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
                 ROPE_TABLE: tl.constexpr, IEEE: tl.constexpr, K_ROTATED: tl.constexpr):
    """One online-softmax step over logical key slots [start, start + TILE_N) (< end),
    gathered page by page from the block table; padding slots masked, V zeroed.
    With K_ROTATED, K comes already rotated from this sequence's scratch rows
    (``krot_ptr`` points at them: [logical slots, kv_heads, 2 * HALF], rows ``stride_kr`` apart)."""
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
    if USE_ROPE and not K_ROTATED:
        k1, k2 = _rotate(k1, k2, tl.where(valid, kpos, 0), cos_ptr, sin_ptr, inv_freq_ptr, stride_rope,
                         HALF, ROPE_TABLE)
    s = _dot(q1, tl.trans(k1), IEEE, DT) + _dot(q2, tl.trans(k2), IEEE, DT)
    allowed = valid[None, :] & (logical[None, :] <= q_logical[:, None])
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_base = v_cache_ptr + slot[:, None] * stride_cs + kv_head * stride_ch
    v1 = tl.load(v_base + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    v2 = tl.load(v_base + HALF + dh[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    acc1 = acc1 * alpha[:, None] + _dot(p, v1, IEEE, DT)
    acc2 = acc2 * alpha[:, None] + _dot(p, v2, IEEE, DT)
    return m_new, l_i, acc1, acc2


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
        block_table_ptr, kv_pos_ptr, krot_ptr, scale,
        stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, stride_kp, stride_rope, stride_krs, stride_kr,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr,
        TILE_N: tl.constexpr, USE_ROPE: tl.constexpr, ROPE_TABLE: tl.constexpr, IEEE: tl.constexpr,
        K_ROTATED: tl.constexpr):
    """BLOCK_M query rows of one sequence, one query head."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(tile_seq_ptr + tile)
    krot_seq = krot_ptr + tl.load(tile_scratch_ptr + tile).to(tl.int64) * stride_krs
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    rmask = rows < tl.load(tile_end_ptr + tile)
    dh = tl.arange(0, HALF)
    q_base = q_ptr + rows[:, None] * stride_qt + head * stride_qh
    q1 = tl.load(q_base + dh[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_base + HALF + dh[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    q_logical = tl.load(q_logical_ptr + rows, mask=rmask, other=-1)
    if USE_ROPE:
        q1, q2 = _rotate(q1, q2, tl.load(q_pos_ptr + rows, mask=rmask, other=0), cos_ptr, sin_ptr,
                         inv_freq_ptr, stride_rope, HALF, ROPE_TABLE)
    q1 = q1 * scale
    q2 = q2 * scale
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
            USE_ROPE, ROPE_TABLE, IEEE, K_ROTATED)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_base = out_ptr + rows[:, None] * stride_qt + head * stride_qh
    tl.store(o_base + dh[None, :], (acc1 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(o_base + HALF + dh[None, :], (acc2 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _decode_kernel(
        q_ptr, part_acc_ptr, part_ml_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, inv_freq_ptr,
        q_pos_ptr, q_logical_ptr, dec_seq_ptr, dec_row_ptr,
        block_table_ptr, kv_pos_ptr, scale,
        stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, stride_kp, stride_rope,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr,
        TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_ROPE: tl.constexpr,
        ROPE_TABLE: tl.constexpr, IEEE: tl.constexpr):
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
    q1 = q1 * scale
    q2 = q2 * scale
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
            USE_ROPE, ROPE_TABLE, IEEE, False)
    # partials laid out [dec, kv_head, split, GROUP_PAD, 2 * HALF] and [..., 2] (m, l)
    base = ((d * tl.num_programs(1) + kv_head) * NUM_SPLITS + split) * GROUP_PAD + g
    tl.store(part_acc_ptr + base[:, None] * (2 * HALF) + dh[None, :], acc1)
    tl.store(part_acc_ptr + base[:, None] * (2 * HALF) + HALF + dh[None, :], acc2)
    tl.store(part_ml_ptr + base * 2, m_i)
    tl.store(part_ml_ptr + base * 2 + 1, l_i)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def paged_attention_triton(q: torch.Tensor, q_pos: torch.Tensor, q_logical: torch.Tensor,
                           cu_q: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_pos: torch.Tensor, page: int,
                           cos_half: torch.Tensor, sin_half: torch.Tensor, scale: float,
                           use_rope: bool = True, inv_freq: torch.Tensor | None = None,
                           block_m: int = 64, tile_n: int = 64, num_splits: int | None = None,
                           decode_tile_n: int = 32, decode_warps: int = 4,
                           rotate_keys_once: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [tokens, heads, head_dim] NoPE queries, rows of sequence i in cu_q[i]:cu_q[i+1];
    block_tables: [seqs, max_pages] int32; kv_pos: [seqs, max_pages * page] int32
    (-1: padding or beyond the sequence); cos_half/sin_half: [max_pos, head_dim/2].
    With ``inv_freq`` [head_dim/2] the rotation is computed in-kernel instead of read
    from the tables. Sequences with one query row take the split-K decode kernel.
    With ``rotate_keys_once`` the prefilling sequences' keys are first rotated into a
    scratch buffer (one pass), and the prefill kernel reads them from there. ``out``
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
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)
    # A CPU tensor here means the interpreter (see _dot).
    ieee = q.dtype == torch.float32 or (dev.type == "cpu" and v_cache.dtype == torch.bfloat16)
    common = dict(PAGE=page, HALF=d // 2, USE_ROPE=use_rope, ROPE_TABLE=rope_table, IEEE=ieee)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
               block_tables.stride(0), kv_pos.stride(0), cos_half.stride(0))
    decode = [i for i in range(len(cu_q) - 1) if cu_q[i + 1] - cu_q[i] == 1]
    prefill = [i for i in range(len(cu_q) - 1) if cu_q[i + 1] - cu_q[i] > 1]
    if prefill:
        bm = max(16, min(block_m, triton.next_power_of_2(max(cu_q[i + 1] - cu_q[i] for i in prefill))))
        tiles = [(i, r, min(r + bm, cu_q[i + 1])) for i in prefill for r in range(cu_q[i], cu_q[i + 1], bm)]
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
        _prefill_kernel[(len(tiles), h)](
            q, out, k_cache, v_cache, cos_half, sin_half, inv_freq, q_pos, q_logical,
            as_i32(seqs), as_i32(starts), as_i32(ends), as_i32([scratch_row[s_] for s_ in seqs]),
            block_tables, kv_pos, krot, scale, *strides,
            krot.stride(0) if k_rotated else 0, krot.stride(1) if k_rotated else 0,
            GROUP=group, BLOCK_M=bm, TILE_N=fit(tile_n), K_ROTATED=k_rotated, **common)
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
            as_i32(decode), rows, block_tables, kv_pos, scale, *strides,
            GROUP=group, GROUP_PAD=gpad, NUM_SPLITS=num_splits, TILE_N=tile, num_warps=decode_warps, **common)
        m, l = part_ml[..., 0], part_ml[..., 1]
        m_max = m.amax(dim=2, keepdim=True)
        w = torch.exp(m - torch.where(torch.isinf(m_max), 0.0, m_max))       # empty splits weigh 0
        acc = (part_acc * w[..., None]).sum(2) / (l * w).sum(2)[..., None]     # [n, kvh, gpad, d]
        out[rows.long()] = acc[:, :, :group].reshape(n, h, d).to(out.dtype)
    return out
