"""Host and device memory: how much the KV pool may take, and how the host heap serves
temporaries."""
from __future__ import annotations

import ctypes
import ctypes.util
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters


def keep_host_temporaries(keep_bytes: int) -> bool:
    """Serve allocations below ``keep_bytes`` from glibc's heap and keep that much freed
    memory there. By default glibc maps each allocation above its (at most 32 MiB)
    threshold afresh and unmaps it when freed, so every large temporary of every layer
    costs a page fault per 4 KiB on first touch: a fifth of a CPU prefill. Process-wide
    (torch's CPU allocator is malloc); False where the C library is not glibc."""
    if keep_bytes <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, keep_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, keep_bytes))
