"""Llama-family forward over the paged KV pool (Llama, Mistral, Qwen2, SmolLM2).

Parameter names follow Hugging Face so a checkpoint's state dict loads as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mepic_ray.config import ModelConfig

# MKL's fp32 product streams a weight poorly against a handful of rows: with the weight
# as the left operand (W·xᵀ) 8 to 64 rows run 1.2-1.26x faster on two cores; from
# about 128 rows on the usual order wins (bench/results/few_rows.md).
_FEW_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[0] > _FEW_ROWS or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.t()).t()
    return out if bias is None else out + bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:     # one fused kernel, the same numbers
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor):
        t, c = x.shape[0], self.c
        # Contiguous, as F.linear gives them for more rows, so everything downstream sees one
        # layout (a few-row product's transposed one is what torch's CPU flash kernel misreads).
        q, k, v = (linear(x, p.weight, p.bias).contiguous() for p in (self.q_proj, self.k_proj, self.v_proj))
        return (q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim),
                v.view(t, c.num_kv_heads, c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        # A buffer, so that moving the model moves it (not saved: the checkpoint keeps two).
        self.register_buffer("gate_up", None, persistent=False)

    def fuse(self) -> None:
        """One weight for gate and up (one product, one read of x); the two checkpoint
        parameters become views of it, so nothing is held twice."""
        n = self.gate_proj.weight.shape[0]
        self.gate_up = torch.cat((self.gate_proj.weight, self.up_proj.weight))
        self.gate_proj.weight = nn.Parameter(self.gate_up[:n], requires_grad=False)
        self.up_proj.weight = nn.Parameter(self.gate_up[n:], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return linear(F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight),
                          self.down_proj.weight)
        gu = linear(x, self.gate_up)
        n = gu.shape[-1] // 2
        return linear(F.silu(gu[..., :n]).mul_(gu[..., n:]), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.scale = c.head_dim ** -0.5

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, write_slots: torch.Tensor, attn,
                k_cache: torch.Tensor, v_cache: torch.Tensor, stop_layer: int = -1) -> torch.Tensor:
        """Run the query tokens through every layer. Their K (rotated at the positions
        the pool stores them at) and V are written to ``write_slots`` (-1: not stored)
        before attention, so later query tokens of the same sequence (and sequences
        reading them) see them in the same layer. ``attn`` is an attention backend
        (``mepic_ray.worker.attention``). Returns the final hidden states, or with
        ``stop_layer`` the K of that layer as it would be stored (a selection probe)."""
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h)
            k = attn.rotate_keys(k)
            if i == stop_layer:
                return k
            attn.write(k_cache[i], v_cache[i], k, v, write_slots)
            o = attn(q, k_cache[i], v_cache[i])
            x = x + linear(o.reshape(o.shape[0], -1), layer.self_attn.o_proj.weight)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head.weight).float()


def build_model(loaded, dtype: str, device: str) -> LlamaForCausalLM:
    """The model on ``device`` with the checkpoint's weights (a ``model_loader.LoadedModel``)."""
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(loaded.config)
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict.items() if "rotary_emb" not in k}
    if loaded.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and loaded.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if loaded.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device).eval()
    for layer in model.model.layers:
        layer.mlp.fuse()
    return model
