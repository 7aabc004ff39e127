"""The step's cascade-attention metadata, built once and read by every layer: which
runs of chunk pages several rows read (``kernels.cascade.SharedRun``), and each
sequence's other keys (one padded batch for single-row sequences, a masked
``PagedSeq`` each for the rest)."""
from __future__ import annotations

import torch

from kernels import RopeTable, build_paged_seq
from kernels.cascade import DecodeBatch, SharedRun


def build_cascade(specs, rows_pos: torch.Tensor, rows_logical: list[torch.Tensor], bs: int, rope: RopeTable,
                  device) -> tuple[list, DecodeBatch | None, list[SharedRun]]:
    # Runs each sequence may read the shared way: wholly before its first query row.
    visible = []
    for s in specs:
        seen: dict = {}
        mine = []
        for blocks, logical, local in s.shared_runs:
            if logical + len(blocks) * bs <= s.query_slots[0]:
                seen[(blocks, local)] = seen.get((blocks, local), -1) + 1   # the same chunk twice: a group each
                mine.append(((blocks, local, seen[(blocks, local)]), logical))
        visible.append(mine)
    readers: dict = {}
    for mine in visible:
        for key, _ in mine:
            readers[key] = readers.get(key, 0) + 1
    own, single, groups, start = [], [], {}, 0
    for s, ql, mine in zip(specs, rows_logical, visible):
        n = ql.numel()
        kv_pos = list(s.positions[:s.query_slots[-1] + 1])
        for key, logical in mine:
            if readers[key] < 2:     # read by this sequence alone: with its other keys, in one gather
                continue
            blocks, local, _ = key
            end = logical + len(blocks) * bs
            i0 = max(0, -local)      # the run's first real slot (front padding is local < 0)
            offset = s.positions[logical + i0] - (local + i0)
            g = groups.setdefault(key, {"blocks": blocks, "local": local, "rows": [], "pos": []})
            g["rows"].append(torch.arange(start, start + n))
            g["pos"].append(rows_pos[start:start + n] - offset)
            kv_pos[logical:end] = [-1] * (end - logical)
        bt = torch.tensor(s.block_table, dtype=torch.long, device=device)
        seq = build_paged_seq(start, ql, bt, torch.tensor(kv_pos, dtype=torch.long, device=device), bs, rope)
        (single if n == 1 else own).append(seq)
        start += n
    return own, _decode_batch(single, device), [_shared_run(g, bs, rope, device) for g in groups.values()]


def _shared_run(g: dict, bs: int, rope: RopeTable, device) -> SharedRun:
    local = torch.arange(g["local"], g["local"] + len(g["blocks"]) * bs, device=device)
    real = torch.nonzero(local >= 0).flatten()
    blocks = torch.tensor(g["blocks"], dtype=torch.long, device=device)
    kv_cos, kv_sin = rope.lookup(local[real])
    q_cos, q_sin = rope.lookup(torch.cat(g["pos"]))
    return SharedRun(blocks[real // bs] * bs + real % bs, kv_cos, kv_sin, torch.cat(g["rows"]).to(device),
                     q_cos, q_sin)


def _decode_batch(seqs: list, device) -> DecodeBatch | None:
    if not seqs:
        return None
    width = max(s.kv_slots.numel() for s in seqs)
    slots = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool, device=device)
    dim = seqs[0].kv_cos.shape[-1]
    cos = torch.zeros(len(seqs), width, dim, dtype=seqs[0].kv_cos.dtype, device=device)
    sin = torch.zeros_like(cos)
    for i, s in enumerate(seqs):
        n = s.kv_slots.numel()
        slots[i, :n], valid[i, :n], cos[i, :n], sin[i, :n] = s.kv_slots, True, s.kv_cos, s.kv_sin
    return DecodeBatch(torch.tensor([s.q_start for s in seqs], device=device), slots, cos, sin,
                       None if bool(valid.all()) else valid)
