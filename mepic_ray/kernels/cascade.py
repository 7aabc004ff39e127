"""Cascade attention over a pool of keys stored rotated (see ``attention_ref``): no
key a step reads is rotated again when all the keys a product reads sit at one offset.

RoPE makes the score of a query at position p and a key at position o + c depend only
on p − (o + c), so a key stored rotated at its chunk-local position c and the query
rotated at p − o (o: where the chunk starts in that request) give the same product,
R(p)ᵀR(o+c) = R(p−o)ᵀR(c). Hence, within one step:
- the pages of a chunk that several sequences read are gathered once per layer, and
  the queries of all those sequences, each turned by its own offset, go against them
  in one matrix product, all such runs in one padded product (``SharedRuns``);
- a decode's keys at offset 0 (all it computed in context) are read as stored, and
  its other keys (a chunk only it reads, a private-copy mode's chunks) form one group
  per offset, all groups of all decodes in one padded product (``KeyGroups``);
- a multi-row piece reads its other keys in one masked product, turning only the keys
  whose offset is not 0 (``OwnKeys``); where its rows are one contiguous run computed
  in this step, they read each other through the causal kernel (which skips the
  blocks above the diagonal) and the keys before them in a product without a mask.
Each query's partial results merge by log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mepic_ray.kernels.rope import apply_rope


@dataclass
class OwnKeys:
    """Keys of a multi-row sequence outside its shared runs, read by its rows
    ``q_start:q_end``: under ``mask``, or causally (key i with row i: the rows' own
    keys, in order), or all of them by every row (neither)."""
    q_start: int
    q_end: int
    kv_slots: torch.Tensor    # [L]
    mask: torch.Tensor | None  # [q_len, L]
    turn: torch.Tensor        # [m] indices into kv_slots of keys whose offset is not 0
    turn_cos: torch.Tensor    # [m, head_dim] at those offsets
    turn_sin: torch.Tensor
    causal: bool = False
    merge: bool = False       # fold into the rows' results of an earlier piece


@dataclass
class KeyGroups:
    """Groups of keys at one offset each, every group read by one query row, padded to
    one length. Padding repeats a real slot of the group (finite) and is masked."""
    rows: torch.Tensor        # [G] query row of each group (rows repeat)
    kv_slots: torch.Tensor    # [G, L]
    valid: torch.Tensor | None   # [G, L]; None: no padding
    q_cos: torch.Tensor | None   # [G, head_dim] at (row position − group offset); None: offset 0
    q_sin: torch.Tensor | None


@dataclass
class SharedRuns:
    """Runs of chunk pages each read by several query rows (each seeing all of its run),
    padded to one length of keys and one of rows: all runs in one product. Padding
    repeats a real slot (or row) of the run and is masked (or left out of the merge)."""
    kv_slots: torch.Tensor    # [R, L] physical slots of each run's real tokens
    valid: torch.Tensor | None   # [R, L]; None: no padding
    rows: torch.Tensor        # [R, n] query rows reading each run, each once
    real_rows: torch.Tensor | None   # [R, n]; None: no padding
    q_cos: torch.Tensor       # [R, n, head_dim] at (query position − chunk offset)
    q_sin: torch.Tensor


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # The CPU flash kernel silently misreads a tensor whose last dimension is not
    # contiguous (a causal product over 5 rows was off by 4.3), so it gets unit strides.
    return t if t.stride(-1) == 1 else t.contiguous()


def _partial(q, k, v, mask, scale, kernel: str = "auto", causal: bool = False):
    """Attention of q [B, n, H, d] over k, v [B, L, Hkv, d] with a boolean mask [B, n, L]
    (or None; ``causal``: n == L, key i visible to rows i and after): (log-sum-exp of the
    scaled scores [B, n, H], normalised output [B, n, H, d])."""
    b, n, heads, d = q.shape
    kv_heads = k.shape[2]
    g = heads // kv_heads
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    if causal:
        # Grouped query heads as heads of their own (the causal diagonal is per row),
        # with K and V expanded, not copied.
        qh = q.transpose(1, 2)
        kh = kt[:, :, None].expand(b, kv_heads, g, *kt.shape[2:]).reshape(b, heads, *kt.shape[2:])
        vh = vt[:, :, None].expand(b, kv_heads, g, *vt.shape[2:]).reshape(b, heads, *vt.shape[2:])
        if _FLASH is not None and q.device.type == "cpu" and kernel != "math":
            out, lse = _FLASH(_unit_stride(qh), _unit_stride(kh), _unit_stride(vh), is_causal=True, scale=scale)
        else:
            s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            lse = torch.logsumexp(s, dim=-1)
            out = torch.matmul(torch.exp(s - lse[..., None]), vh)
        return lse.transpose(1, 2), out.transpose(1, 2)
    # Grouped query heads ride as extra query rows, so K and V are never repeated.
    qg = q.reshape(b, n, kv_heads, g, d).permute(0, 2, 1, 3, 4).reshape(b, kv_heads, n * g, d)
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.repeat_interleave(g, dim=1)[:, None]          # [B, 1, n*g, L]
    # The flash kernel parallelises over (batch, head) pairs and blocks of query rows:
    # with few of both (one decode, a run one sequence reads) a plain product is faster.
    wide = b * kv_heads >= 8 or n * g >= 64
    if _FLASH is not None and q.device.type == "cpu" and (kernel == "flash" or kernel == "auto" and wide):
        # The CPU flash kernel returns the log-sum-exp that merging needs (public SDPA does not).
        out, lse = _FLASH(_unit_stride(qg), _unit_stride(kt), _unit_stride(vt), attn_mask=bias, scale=scale)
    else:
        s = torch.matmul(qg, kt.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), vt)
    out = out.reshape(b, kv_heads, n, g, d).permute(0, 2, 1, 3, 4).reshape(b, n, heads, d)
    return lse.reshape(b, kv_heads, n, g).permute(0, 2, 1, 3).reshape(b, n, heads), out


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype) -> torch.Tensor:
    # index_select is about 3x faster than advanced indexing for these gathers on CPU.
    return cache.index_select(0, slots.flatten()).view(*slots.shape, *cache.shape[1:]).to(dtype)


def _merge(lse_all, out_all, rows, lse, out) -> None:
    """Fold partials (lse [n, H], out [n, H, d]) of ``rows`` (which may repeat) into the
    rows' running results, in place."""
    lse, out = lse.to(lse_all.dtype), out.to(out_all.dtype)
    m = lse_all.scatter_reduce(0, rows[:, None].expand_as(lse), lse, "amax")
    w_old = torch.exp(lse_all - m)
    w_new = torch.exp(lse - m[rows])
    num = (out_all * w_old[..., None]).index_add_(0, rows, out * w_new[..., None])
    den = w_old.index_add_(0, rows, w_new)
    out_all.copy_(num / den[..., None])
    lse_all.copy_(m + torch.log(den))


def cascade_attention(q_nope: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, own: list[OwnKeys], decodes: KeyGroups | None,
                      groups: KeyGroups | None, shared: SharedRuns | None, scale: float,
                      kernel: str = "auto") -> torch.Tensor:
    """q_nope [rows, H, d]; q_cos/q_sin at the rows' positions. ``own``: multi-row
    sequences' keys outside their shared runs; ``decodes``: each single-row sequence's
    keys at offset 0 (one group per row, the row itself among them); ``groups``: those
    sequences' other keys outside shared runs; ``shared``: the runs. ``own`` and
    ``decodes`` cover every row once. ``kernel``: "flash" (the CPU flash kernel), "math"
    (plain products) or "auto" (by shape)."""
    rows, heads, d = q_nope.shape
    # Products in the pool's precision (bf16 runs on the CPU's matrix units), their
    # log-sum-exp merges in fp32.
    cd = k_cache.dtype
    q = apply_rope(q_nope, q_cos, q_sin).to(cd)
    lse_all = q.new_empty((rows, heads), dtype=torch.float32)
    out_all = q.new_empty((rows, heads, d), dtype=torch.float32)
    for s in own:
        k = _gather(k_cache, s.kv_slots, q.dtype)
        if s.turn.numel():
            k[s.turn] = apply_rope(k[s.turn], s.turn_cos, s.turn_sin).to(cd)
        lse, out = _partial(q[None, s.q_start:s.q_end], k[None], _gather(v_cache, s.kv_slots, q.dtype)[None],
                            None if s.mask is None else s.mask[None], scale, kernel, s.causal)
        if s.merge:
            rows_of = torch.arange(s.q_start, s.q_end, device=q.device)
            _merge(lse_all, out_all, rows_of, lse[0], out[0])
        else:
            lse_all[s.q_start:s.q_end], out_all[s.q_start:s.q_end] = lse[0], out[0]
    if decodes is not None:
        lse, out = _group_partial(q[decodes.rows], decodes, k_cache, v_cache, scale, kernel)
        lse_all[decodes.rows], out_all[decodes.rows] = lse.to(lse_all.dtype), out.to(out_all.dtype)
    if groups is not None:
        qg = apply_rope(q_nope[groups.rows], groups.q_cos, groups.q_sin).to(cd)
        _merge(lse_all, out_all, groups.rows, *_group_partial(qg, groups, k_cache, v_cache, scale, kernel))
    if shared is not None:
        r, n = shared.rows.shape
        qr = apply_rope(q_nope[shared.rows.flatten()], shared.q_cos.flatten(0, 1), shared.q_sin.flatten(0, 1)).to(cd)
        mask = None if shared.valid is None else shared.valid[:, None, :].expand(r, n, -1)
        lse, out = _partial(qr.view(r, n, heads, d), _gather(k_cache, shared.kv_slots, q.dtype),
                            _gather(v_cache, shared.kv_slots, q.dtype), mask, scale, kernel)
        if shared.real_rows is None:
            _merge(lse_all, out_all, shared.rows.flatten(), lse.flatten(0, 1), out.flatten(0, 1))
        else:
            real = shared.real_rows
            _merge(lse_all, out_all, shared.rows[real], lse[real], out[real])
    return out_all.to(q_nope.dtype)


def _group_partial(q_rows, g: KeyGroups, k_cache, v_cache, scale, kernel):
    """One query row per group over its keys, all groups in one padded product."""
    k = _gather(k_cache, g.kv_slots, q_rows.dtype)            # [G, L, Hkv, d]
    v = _gather(v_cache, g.kv_slots, q_rows.dtype)
    mask = None if g.valid is None else g.valid[:, None]
    lse, out = _partial(q_rows[:, None], k, v, mask, scale, kernel)
    return lse[:, 0], out[:, 0]
