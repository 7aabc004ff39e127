"""How much memory the KV pool may take: the device's (the GPU's, or the host's RAM)."""
from __future__ import annotations

import os

import torch

from mepic_ray.config import EngineConfig


def device_memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of the device's memory: the GPU's, or the host's RAM."""
    if str(device).startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return total, free
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        free = total
    return total, free


def pool_bytes(cfg: EngineConfig) -> int:
    """``kv_cache_bytes`` if set, else ``kv_cache_memory_fraction`` of the device's memory,
    never more than half of what is free once the weights are loaded (other replicas
    share the machine)."""
    if cfg.kv_cache_bytes is not None:
        return cfg.kv_cache_bytes
    total, free = device_memory(cfg.device)
    return int(min(cfg.kv_cache_memory_fraction * total, 0.5 * free))
