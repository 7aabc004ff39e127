"""The dense part of a decoder layer: the two RMSNorms, the projections, SiLU and the
residual adds, everything but attention.

Eager, each is one torch op and a pass over memory; on two cores the element-wise passes
of a 4,096-row prefill cost more than its bf16 products. ``DenseLayers(compile=True)``
runs them through torch.compile (inductor), which fuses each chain into one loop, as
vLLM's CPU backend does: 1.14x (bf16) and 1.04x (fp32) on bench.vllm_compare's trace
(bench/results/vllm_compare_compile_*.md). Attention stays eager: its layouts are the KV
manager's, and it is where the modes differ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# MKL's fp32 product streams a weight poorly against a handful of rows: with the weight
# as the left operand (W·xᵀ) 8 to 64 rows run 1.2-1.26x faster on two cores; from
# about 128 rows on the usual order wins (bench/results/few_rows.md). Compiled code is
# no faster there either (its guards cost more than it fuses), so few rows stay eager.
FEW_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[0] > FEW_ROWS or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.t()).t()
    return out if bias is None else out + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:     # one kernel, the same numbers
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Hugging Face's order: normalise in fp32, round, then scale in the model's dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def attn_in(x, norm_w, eps: float, wq, bq, wk, bk, wv, bv):
    """The layer's input norm and q, k, v projections (2-D, contiguous)."""
    h = rms_norm(x, norm_w, eps)
    # Contiguous, as F.linear gives them for more rows, so everything downstream sees one
    # layout (a few-row product's transposed one is what torch's CPU flash kernel misreads).
    return tuple(linear(h, w, b).contiguous() for w, b in ((wq, bq), (wk, bk), (wv, bv)))


def attn_out(x, o, wo, norm_w, eps: float, w_gate_up, w_down):
    """The residual after attention (output projection), then the MLP and its residual.
    ``w_gate_up`` is gate and up as one weight: one product, one read of the rows."""
    x = x + linear(o, wo)
    gu = linear(rms_norm(x, norm_w, eps), w_gate_up)
    n = gu.shape[-1] // 2
    return x + linear(F.silu(gu[..., :n]).mul_(gu[..., n:]), w_down)


class DenseLayers:
    """A decoder layer's dense ops, eager or compiled. One compiled graph serves every
    layer: the weights are its inputs, so layers of one shape share it."""

    def __init__(self, compile: bool = False):
        self.compiled = None
        if compile:
            self.compiled = (torch.compile(attn_in, dynamic=True, fullgraph=True),
                             torch.compile(attn_out, dynamic=True, fullgraph=True))

    def _pick(self, x: torch.Tensor, i: int):
        if self.compiled is None or x.shape[0] <= FEW_ROWS:
            return (attn_in, attn_out)[i]
        return self.compiled[i]

    def qkv(self, layer, x: torch.Tensor):
        a, n = layer.self_attn, layer.input_layernorm
        return self._pick(x, 0)(x, n.weight, n.eps, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight,
                                a.k_proj.bias, a.v_proj.weight, a.v_proj.bias)

    def residual(self, layer, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        n, mlp = layer.post_attention_layernorm, layer.mlp
        return self._pick(x, 1)(x, o, layer.self_attn.o_proj.weight, n.weight, n.eps, mlp.gate_up,
                                mlp.down_proj.weight)

    def warm_up(self, layer, hidden_size: int, dtype: torch.dtype, device: str) -> None:
        """Compile now, not in the first request's step (seconds on two cores)."""
        if self.compiled is None:
            return
        with torch.inference_mode():     # as the forward runs: other tensors, other guards
            x = torch.zeros(2 * FEW_ROWS, hidden_size, dtype=dtype, device=device)
            q = self.qkv(layer, x)[0]
            self.residual(layer, x, torch.zeros_like(q))
