"""Cascade attention over shared chunk pages (torch): within one step, the pages of a
chunk that several sequences read are gathered and rotated once per layer, and the
queries of all those sequences go against them in one matrix product; each query's
partial result is merged with the rest of its keys by log-sum-exp.

Why the queries can share one rotation of the chunk's keys: RoPE makes the score of a
query at position p and a key at position o + c depend only on p − (o + c), so a key
rotated at its chunk-local position c and the query rotated at p − o (o: where the
chunk starts in that request) give the same product, R(p)ᵀR(o+c) = R(p−o)ᵀR(c).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention_ref import PagedSeq
from kernels.rope import apply_rope


@dataclass
class SharedRun:
    """A run of chunk pages read by several query rows (each seeing all of it)."""
    kv_slots: torch.Tensor    # [L] physical slots of the run's real tokens
    kv_cos: torch.Tensor      # [L, head_dim] at chunk-local positions
    kv_sin: torch.Tensor
    rows: torch.Tensor        # [n] query rows reading the run, each once
    q_cos: torch.Tensor       # [n, head_dim] at (query position − chunk offset)
    q_sin: torch.Tensor


@dataclass
class DecodeBatch:
    """Single-row sequences' other keys, padded to one length: one product for all."""
    rows: torch.Tensor        # [S]
    kv_slots: torch.Tensor    # [S, L]
    kv_cos: torch.Tensor      # [S, L, head_dim]
    kv_sin: torch.Tensor
    valid: torch.Tensor | None   # [S, L]; None: no padding


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _partial(q, k, v, mask, scale, kernel: str = "auto"):
    """Attention of q [B, n, H, d] over k, v [B, L, Hkv, d] with a boolean mask [B, n, L]
    (or None): (log-sum-exp of the scaled scores [B, n, H], normalised output [B, n, H, d]).
    Grouped query heads ride as extra query rows, so K and V are never repeated."""
    b, n, heads, d = q.shape
    kv_heads = k.shape[2]
    g = heads // kv_heads
    qg = q.reshape(b, n, kv_heads, g, d).permute(0, 2, 1, 3, 4).reshape(b, kv_heads, n * g, d)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.repeat_interleave(g, dim=1)[:, None]          # [B, 1, n*g, L]
    # The flash kernel parallelises over (batch, head) pairs and blocks of query rows:
    # with few of both (one decode, a run one sequence reads) a plain product is faster.
    wide = b * kv_heads >= 8 or n * g >= 64
    if _FLASH is not None and q.device.type == "cpu" and (kernel == "flash" or kernel == "auto" and wide):
        # The CPU flash kernel returns the log-sum-exp that merging needs (public SDPA does not).
        out, lse = _FLASH(qg, kt, vt, attn_mask=bias, scale=scale)
    else:
        s = torch.matmul(qg, kt.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), vt)
    out = out.reshape(b, kv_heads, n, g, d).permute(0, 2, 1, 3, 4).reshape(b, n, heads, d)
    return lse.reshape(b, kv_heads, n, g).permute(0, 2, 1, 3).reshape(b, n, heads), out


def cascade_attention(q_nope: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, own: list[PagedSeq], decodes: DecodeBatch | None,
                      shared: list[SharedRun], scale: float, kernel: str = "auto") -> torch.Tensor:
    """q_nope [rows, H, d]. ``own``: multi-row sequences' keys outside their shared runs
    (masked causally, as ``paged_attention_ref``); ``decodes``: single-row sequences'
    keys outside theirs; ``shared``: the runs. Every row has at least one own key (itself).
    ``kernel``: "flash" (the CPU flash kernel), "math" (plain products) or "auto" (by shape)."""
    rows, heads, d = q_nope.shape
    q = apply_rope(q_nope, q_cos, q_sin)
    lse_all = q.new_empty((rows, heads))
    out_all = q.new_empty((rows, heads, d))
    for s in own:
        k = apply_rope(k_cache[s.kv_slots].to(q.dtype), s.kv_cos, s.kv_sin)
        lse, out = _partial(q[None, s.q_start:s.q_end], k[None], v_cache[s.kv_slots].to(q.dtype)[None],
                            s.mask[None], scale, kernel)
        lse_all[s.q_start:s.q_end], out_all[s.q_start:s.q_end] = lse[0], out[0]
    if decodes is not None:
        kv_heads = k_cache.shape[1]
        k = k_cache[decodes.kv_slots].to(q.dtype)                          # [S, L, Hkv, d]
        v = v_cache[decodes.kv_slots].to(q.dtype)
        mask = None
        if decodes.valid is not None:
            # The padding's slot may hold anything (NaN too): zeroed, since 0 * NaN is NaN.
            hole = ~decodes.valid[..., None, None]
            k, v, mask = k.masked_fill(hole, 0), v.masked_fill(hole, 0), decodes.valid[:, None]
        k = apply_rope(k.flatten(0, 1), decodes.kv_cos.flatten(0, 1), decodes.kv_sin.flatten(0, 1))
        k = k.view(*decodes.kv_slots.shape, kv_heads, d)
        lse, out = _partial(q[decodes.rows][:, None], k, v, mask, scale, kernel)
        lse_all[decodes.rows], out_all[decodes.rows] = lse[:, 0], out[:, 0]
    for run in shared:
        k = apply_rope(k_cache[run.kv_slots].to(q.dtype), run.kv_cos, run.kv_sin)
        qr = apply_rope(q_nope[run.rows], run.q_cos, run.q_sin)
        lse, out = _partial(qr[None], k[None], v_cache[run.kv_slots].to(q.dtype)[None], None, scale, kernel)
        lse, out = lse[0], out[0]
        lse_old = lse_all[run.rows]
        lse_new = torch.logaddexp(lse_old, lse)
        out_all[run.rows] = (out_all[run.rows] * torch.exp(lse_old - lse_new)[..., None]
                             + out * torch.exp(lse - lse_new)[..., None])
        lse_all[run.rows] = lse_new
    return out_all
