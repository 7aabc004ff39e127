"""Rotary position embedding tables (plain ``rope_theta`` and Llama-3 scaling)."""
from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float()
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq.float()
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled).float()


class RopeTable:
    """cos/sin per position, grown on demand; padding positions (-1) read row 0
    because their keys are masked and their values never matter."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)
        self.device, self.dtype = device, dtype
        self.cos = self.sin = torch.empty(0, head_dim, device=device, dtype=dtype)
        self._grow(4096)

    def _grow(self, n: int) -> None:
        t = torch.arange(n, device=self.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def ensure(self, num_positions: int) -> None:
        if num_positions > self.cos.shape[0]:
            self._grow(max(num_positions, 2 * self.cos.shape[0]))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ensure(int(positions.max()) + 1 if positions.numel() else 0)
        idx = positions.clamp(min=0)
        return self.cos[idx], self.sin[idx]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] by per-token cos/sin [tokens, head_dim]
    (the rotate-half convention of Hugging Face Llama)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    # x·cos + rotate_half(x)·sin, the second term added into the first half by half:
    # no rotated copy of x and no sum temporary (half the time on CPU).
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out
