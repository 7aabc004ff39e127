"""Owns the model and the KV tensors; turns sequence specs into one forward."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kernels import PagedSeq, RopeTable, build_paged_seq
from mepic_ray.config import EngineConfig, ModelConfig
from mepic_ray.model import LlamaForCausalLM


@dataclass
class SeqSpec:
    """One sequence of a forward: which logical slots to compute, over which pages."""
    token_ids: list[int]
    positions: list[int]           # RoPE position of every logical slot, -1 for padding
    block_table: list[int]
    query_slots: list[int]
    blend_candidates: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, mcfg: ModelConfig, cfg: EngineConfig, num_blocks: int):
        self.model, self.mcfg, self.cfg = model, mcfg, cfg
        self.bs = cfg.block_size
        dtype = getattr(torch, cfg.dtype)
        shape = (mcfg.num_layers, num_blocks * self.bs, mcfg.num_kv_heads, mcfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=cfg.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=cfg.device)
        self.rope = RopeTable(mcfg.head_dim, mcfg.rope_theta, mcfg.rope_scaling, cfg.device)
        # EPIC / CacheBlend keep chunk KV off the pool (LMCache's role in the paper)
        # and copy it into each request's private pages.
        self.host_store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_blend_selected: list[list[int]] = []

    def _slots(self, block_table: list[int], logical: list[int]) -> torch.Tensor:
        bt = torch.tensor(block_table, dtype=torch.long)
        lg = torch.tensor(logical, dtype=torch.long)
        return bt[lg // self.bs] * self.bs + lg % self.bs

    def forward(self, specs: list[SeqSpec], blend: bool = False) -> torch.Tensor:
        """Returns the final hidden state of each spec's last query slot."""
        ids, qpos, wslots, seqs, cand, seq_of_row = [], [], [], [], [], []
        for i, s in enumerate(specs):
            last = s.query_slots[-1]
            kv_pos = torch.tensor(s.positions[:last + 1], dtype=torch.long)
            bt = torch.tensor(s.block_table, dtype=torch.long)
            ql = torch.tensor(s.query_slots, dtype=torch.long)
            seqs.append(build_paged_seq(len(ids), ql, bt, kv_pos, self.bs, self.rope))
            ids += [s.token_ids[j] for j in s.query_slots]
            qpos += [s.positions[j] for j in s.query_slots]
            wslots.append(bt[ql // self.bs] * self.bs + ql % self.bs)
            cset = set(s.blend_candidates)
            cand += [j in cset for j in s.query_slots]
            seq_of_row += [i] * len(s.query_slots)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.cfg.device)
        q_cos, q_sin = self.rope.lookup(torch.tensor(qpos, dtype=torch.long))
        hook = None
        if blend:
            hook = self._blend_hook(seqs, [s.query_slots for s in specs], torch.tensor(cand), torch.tensor(seq_of_row))
        hidden, rows = self.model(input_ids, q_cos, q_sin, torch.cat(wslots), seqs,
                                  self.k_cache, self.v_cache,
                                  blend_layer=self.cfg.cacheblend_check_layer if blend else -1,
                                  blend_hook=hook)
        last_rows = torch.tensor([s.q_end - 1 for s in seqs])
        pos_in_out = torch.searchsorted(rows, last_rows)
        return hidden[pos_in_out]

    def _blend_hook(self, seqs: list[PagedSeq], query_slots: list[list[int]], cand: torch.Tensor,
                    seq_of_row: torch.Tensor):
        """CacheBlend's selection: at the check layer keep every non-candidate row
        and, per sequence, the ``ratio`` of candidate (reused chunk) tokens whose
        fresh K deviates most from the cached K."""
        layer = self.cfg.cacheblend_check_layer
        ratio = self.cfg.cacheblend_ratio
        self.last_blend_selected: list[list[int]] = []

        def hook(k: torch.Tensor, write_slots: torch.Tensor):
            dev = (k.float() - self.k_cache[layer][write_slots].float()).pow(2).sum(dim=(1, 2))
            keep_mask = ~cand
            for i in range(len(seqs)):
                rows = torch.nonzero(cand & (seq_of_row == i)).flatten()
                n = math.ceil(ratio * rows.numel())
                chosen = rows[torch.topk(dev[rows], n).indices] if n else rows[:0]
                keep_mask[chosen] = True
                self.last_blend_selected.append([query_slots[i][r - seqs[i].q_start] for r in chosen.tolist()])
            keep = torch.nonzero(keep_mask).flatten()
            new_seqs, start = [], 0
            for s in seqs:
                local = keep[(keep >= s.q_start) & (keep < s.q_end)] - s.q_start
                new_seqs.append(PagedSeq(start, start + local.numel(), s.kv_slots, s.kv_cos, s.kv_sin, s.mask[local]))
                start += local.numel()
            return keep, new_seqs
        return hook

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    # -- private copies for the EPIC / CacheBlend baselines -----------------
    def snapshot(self, chunk_hash: str, block_table: list[int], num_slots: int) -> None:
        slots = self._slots(block_table, list(range(num_slots)))
        self.host_store[chunk_hash] = (self.k_cache[:, slots].clone(), self.v_cache[:, slots].clone())

    def copy_in(self, chunk_hash: str, block_table: list[int]) -> None:
        k, v = self.host_store[chunk_hash]
        slots = self._slots(block_table, list(range(k.shape[1])))
        self.k_cache[:, slots] = k
        self.v_cache[:, slots] = v
