"""Chunk KV as it travels to and from the object-store tier: raw bytes (so bf16 travels
too, and Ray stores it zero-copy as numpy), and what a replica asks the store for."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# What the bytes of a stored key mean. 1 (unnamed in older objects): NoPE keys. 2: keys
# rotated at their chunk-local positions. Part of the layout every object carries, which
# a replica compares before loading, so an object of another format is never read as this one.
KV_FORMAT = 2


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
