"""Llama-family forward over the paged KV pool (Llama, Mistral, Qwen2, SmolLM2).

Parameter names follow Hugging Face so a checkpoint's state dict loads as is.
"""
from __future__ import annotations

import torch
from torch import nn

from mepic_ray.config import ModelConfig
from mepic_ray.worker.dense import DenseLayers, linear, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        t, c = q.shape[0], self.c
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
    def __init__(self, c: ModelConfig, dense: DenseLayers | None = None):
        super().__init__()
        self.config = c
        self.dense = dense or DenseLayers()
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
            q, k, v = layer.self_attn.heads(*self.dense.qkv(layer, x))
            k = attn.rotate_keys(k)
            if i == stop_layer:
                return k
            attn.write(k_cache[i], v_cache[i], k, v, write_slots)
            o = attn(q, k_cache[i], v_cache[i])
            x = self.dense.residual(layer, x, o.reshape(o.shape[0], -1))
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head.weight).float()


def build_model(loaded, dtype: str, device: str, compile: bool = False) -> LlamaForCausalLM:
    """The model on ``device`` with the checkpoint's weights (a ``model_loader.LoadedModel``);
    with ``compile``, its dense ops run through torch.compile (``worker/dense.py``)."""
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(loaded.config, DenseLayers(compile))
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
    model.dense.warm_up(model.model.layers[0], loaded.config.hidden_size, torch_dtype, device)
    return model
