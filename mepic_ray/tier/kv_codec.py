"""Chunk KV as it travels to and from the object-store tier: raw bytes (so bf16 travels
too, and Ray stores it zero-copy as numpy), and what a replica asks the store for."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ChunkWant:
    chunk_hash: str
    padded_ids: tuple[int, ...]
    shared_tokens: int          # real tokens held by the chunk's canonical blocks
    shape: tuple[int, ...]    # [2, layers, block slots, kv heads, head dim] its blocks need


def encode_kv(kv: torch.Tensor) -> np.ndarray:
    """Raw bytes, so bf16 travels too and Ray stores it zero-copy as numpy."""
    return kv.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()


def decode_kv(buf: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.array(buf, copy=True)).view(dtype).reshape(shape)
