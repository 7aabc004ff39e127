"""Cascade attention over a pool of keys stored rotated (see ``attention_ref``): no
key a step reads is rotated again when all the keys a product reads sit at one offset.

RoPE makes the score of a query at position p and a key at position o + c depend only
on p − (o + c), so a key stored rotated at its chunk-local position c and the query
rotated at p − o (o: where the chunk starts in that request) give the same product,
R(p)ᵀR(o+c) = R(p−o)ᵀR(c). Hence, within one step:
- the pages of a chunk that several sequences read are gathered once per layer, and
  the queries of all those sequences, each turned by its own offset, go against them
  in one matrix product; runs of similar shape share one padded product (``SharedRuns``);
- a decode's keys at offset 0 (all it computed in context) are read as stored, and
  its other keys (a chunk only it reads, a private-copy mode's chunks) form one group
  per offset, all groups of all decodes in one padded product (``KeyGroups``);
- a multi-row piece gathers its other keys once, turning only those whose offset is
  not 0 (``OwnKeys``), and reads them in tiles of rows (``KeyTile``): where its rows
  are the only keys from its first row on, they read each other through the causal
  kernel (which skips the blocks above the diagonal) and the keys before them without
  a mask; otherwise (rows between chunks) each tile reads the keys before it without
  a mask and masks only the keys among its own rows.
Each query's partial results merge by log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mepic_ray.kernels.rope import apply_rope


@dataclass
class KeyTile:
    """Rows ``q_start:q_end`` reading keys ``k_start:k_end`` of their sequence's own
    keys: under ``mask`` [rows, keys], or causally (key i with row i), or all of them."""
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    mask: torch.Tensor | None
    causal: bool = False
    merge: bool = False       # fold into the rows' results of an earlier tile
    bias: torch.Tensor | None = None   # the mask as ``row_bias``, built by the first layer for the rest


@dataclass
class OwnKeys:
    """Keys of a multi-row sequence outside its shared runs, gathered and turned once
    per layer, read tile by tile (``KeyTile``)."""
    kv_slots: torch.Tensor    # [L]
    turn: torch.Tensor        # [m] indices into kv_slots of keys whose offset is not 0
    turn_cos: torch.Tensor    # [m, head_dim] at those offsets
    turn_sin: torch.Tensor
    tiles: list[KeyTile]


@dataclass
class KeyGroups:
    """Groups of keys at one offset each, every group read by one query row, padded to
    one length. Padding repeats a real slot of the group (finite) and is masked."""
    rows: torch.Tensor        # [G] query row of each group (rows repeat)
    kv_slots: torch.Tensor    # [G, L]
    valid: torch.Tensor | None   # [G, L]; None: no padding
    q_cos: torch.Tensor | None   # [G, head_dim] at (row position − group offset); None: offset 0
    q_sin: torch.Tensor | None
    bias: torch.Tensor | None = None   # ``valid`` as ``key_bias``, built by the first layer for the rest


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
    bias: torch.Tensor | None = None   # as in KeyGroups


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # The CPU flash kernel silently misreads a tensor whose last dimension is not
    # contiguous (a causal product over 5 rows was off by 4.3), so it gets unit strides.
    return t if t.stride(-1) == 1 else t.contiguous()


def row_bias(mask: torch.Tensor, heads_per_kv: int, dtype) -> torch.Tensor:
    """A boolean mask [B, n, L] as the additive one ``_partial`` takes: [B, 1, n*g, L],
    each row's grouped query heads riding as rows of their own."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias.repeat_interleave(heads_per_kv, dim=1)[:, None]


def key_bias(valid: torch.Tensor, dtype) -> torch.Tensor:
    """Which keys [B, L] every row may read, as an additive mask the kernels broadcast: [B, 1, 1, L]."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))[:, None, None]


def _partial(q, k, v, bias, scale, kernel: str = "auto", causal: bool = False):
    """Attention of q [B, n, H, d] over k, v [B, L, Hkv, d] under an additive mask
    (``row_bias`` or ``key_bias``; or None; ``causal``: n == L, key i visible to rows i
    and after): (log-sum-exp of the scaled scores [B, n, H], normalised output [B, n, H, d])."""
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
    # Only the rows with partials change. In a step of prefill pieces that may be one
    # sequence's few hundred rows of 4,096, and each pass over all of them is ~10 MB.
    touched, at = torch.unique(rows, return_inverse=True)
    every = touched.numel() == lse_all.shape[0]       # then touched is every row, in order
    old_lse, old_out = (lse_all, out_all) if every else (lse_all[touched], out_all[touched])
    m = old_lse.scatter_reduce(0, at[:, None].expand_as(lse), lse, "amax")
    w_old = torch.exp(old_lse - m)
    w_new = torch.exp(lse - m[at])
    num = (old_out * w_old[..., None]).index_add_(0, at, out * w_new[..., None])
    den = w_old.index_add_(0, at, w_new)
    if every:
        out_all.copy_(num / den[..., None])
        lse_all.copy_(m + torch.log(den))
    else:
        out_all[touched] = num / den[..., None]
        lse_all[touched] = m + torch.log(den)


def cascade_attention(q_nope: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, own: list[OwnKeys], decodes: KeyGroups | None,
                      groups: KeyGroups | None, shared: list[SharedRuns], scale: float,
                      kernel: str = "auto") -> torch.Tensor:
    """q_nope [rows, H, d]; q_cos/q_sin at the rows' positions. ``own``: multi-row
    sequences' keys outside their shared runs; ``decodes``: each single-row sequence's
    keys at offset 0 (one group per row, the row itself among them); ``groups``: those
    sequences' other keys outside shared runs; ``shared``: the runs, in padded products.
    ``own`` and ``decodes`` cover every row once. ``kernel``: "flash" (the CPU flash
    kernel), "math" (plain products) or "auto" (by shape)."""
    rows, heads, d = q_nope.shape
    # Products in the pool's precision (bf16 runs on the CPU's matrix units), their
    # log-sum-exp merges in fp32.
    cd = k_cache.dtype
    q = apply_rope(q_nope, q_cos, q_sin).to(cd)
    lse_all = q.new_empty((rows, heads), dtype=torch.float32)
    out_all = q.new_empty((rows, heads, d), dtype=torch.float32)
    # Every partial result beyond a row's first (several per row) merges in one pass.
    parts = []
    for s in own:
        k = _gather(k_cache, s.kv_slots, q.dtype)
        if s.turn.numel():
            k[s.turn] = apply_rope(k[s.turn], s.turn_cos, s.turn_sin).to(cd)
        v = _gather(v_cache, s.kv_slots, q.dtype)
        for t in s.tiles:
            if t.mask is not None and t.bias is None:
                t.bias = row_bias(t.mask[None], heads // k.shape[1], q.dtype)
            lse, out = _partial(q[None, t.q_start:t.q_end], k[None, t.k_start:t.k_end], v[None, t.k_start:t.k_end],
                                t.bias, scale, kernel, t.causal)
            if t.merge:
                parts.append((torch.arange(t.q_start, t.q_end, device=q.device), lse[0], out[0]))
            else:
                lse_all[t.q_start:t.q_end], out_all[t.q_start:t.q_end] = lse[0], out[0]
    if decodes is not None:
        lse, out = _group_partial(q[decodes.rows], decodes, k_cache, v_cache, scale, kernel)
        lse_all[decodes.rows], out_all[decodes.rows] = lse.to(lse_all.dtype), out.to(out_all.dtype)
    if groups is not None:
        qg = apply_rope(q_nope[groups.rows], groups.q_cos, groups.q_sin).to(cd)
        parts.append((groups.rows, *_group_partial(qg, groups, k_cache, v_cache, scale, kernel)))
    for run in shared:
        r, n = run.rows.shape
        qr = apply_rope(q_nope[run.rows.flatten()], run.q_cos.flatten(0, 1), run.q_sin.flatten(0, 1)).to(cd)
        if run.valid is not None and run.bias is None:
            run.bias = key_bias(run.valid, q.dtype)
        lse, out = _partial(qr.view(r, n, heads, d), _gather(k_cache, run.kv_slots, q.dtype),
                            _gather(v_cache, run.kv_slots, q.dtype), run.bias, scale, kernel)
        if run.real_rows is None:
            parts.append((run.rows.flatten(), lse.flatten(0, 1), out.flatten(0, 1)))
        else:
            parts.append((run.rows[run.real_rows], lse[run.real_rows], out[run.real_rows]))
    if parts:
        _merge(lse_all, out_all, *(torch.cat(x) for x in zip(*parts)))
    return out_all.to(q_nope.dtype)


def _group_partial(q_rows, g: KeyGroups, k_cache, v_cache, scale, kernel):
    """One query row per group over its keys, all groups in one padded product."""
    k = _gather(k_cache, g.kv_slots, q_rows.dtype)            # [G, L, Hkv, d]
    v = _gather(v_cache, g.kv_slots, q_rows.dtype)
    if g.valid is not None and g.bias is None:
        g.bias = key_bias(g.valid, q_rows.dtype)
    lse, out = _partial(q_rows[:, None], k, v, g.bias, scale, kernel)
    return lse[:, 0], out[:, 0]
