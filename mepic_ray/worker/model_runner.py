"""Owns the model and the KV tensors; turns sequence specs into one forward."""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch

from kernels import RopeTable
from mepic_ray.worker.attention import TorchAttention, TritonAttention, resolve_backend
from mepic_ray.config import EngineConfig, ModelConfig
from mepic_ray.worker.model import LlamaForCausalLM


@dataclass
class SeqSpec:
    """One sequence of a forward: which logical slots to compute, over which blocks."""
    token_ids: list[int]
    positions: list[int]           # RoPE position of every logical slot, -1 for padding
    block_table: list[int]
    query_slots: list[int]
    blend_candidates: list[int] = field(default_factory=list)


class _ProbeDone(Exception):
    """Ends a selection probe's forward at the check layer."""


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, mcfg: ModelConfig, cfg: EngineConfig, num_blocks: int):
        self.model, self.mcfg, self.cfg = model, mcfg, cfg
        self.bs = cfg.block_size
        self.device = torch.device(cfg.device)
        self.backend = resolve_backend(cfg.attention_backend, cfg.device, mcfg.head_dim, cfg.block_size)
        if self.backend == "triton":
            options = dict(rope_runs=cfg.triton_rope_runs, rotate_keys_once=cfg.triton_rotate_keys_once,
                           pack_gqa=cfg.triton_pack_gqa)
            self.build_attention = functools.partial(TritonAttention.build, options=options)
        else:
            self.build_attention = TorchAttention.build
        dtype = getattr(torch, cfg.dtype)
        shape = (mcfg.num_layers, num_blocks * self.bs, mcfg.num_kv_heads, mcfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=cfg.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=cfg.device)
        self.rope = RopeTable(mcfg.head_dim, mcfg.rope_theta, mcfg.rope_scaling, cfg.device)
        # EPIC / CacheBlend: chunk KV kept off the pool, by chunk hash (the KV manager's
        # HostCopies decides which are kept and when they are dropped).
        self.host_copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.blend = cfg.reuse.blend()     # (ratio, check layer) in CacheBlend, else None
        if self.blend is not None and not 0 <= self.blend[1] < mcfg.num_layers:
            raise ValueError(f"cacheblend check_layer {self.blend[1]} is not a layer of this "
                             f"{mcfg.num_layers}-layer model")
        self.last_blend_selected: list[list[int]] = []
        self.last_selected_blocks: list[list[int]] = []    # MEPIC block selection, per probed sequence

    def _slots(self, block_table: list[int], logical: list[int]) -> torch.Tensor:
        bt = torch.tensor(block_table, dtype=torch.long, device=self.device)
        lg = torch.tensor(logical, dtype=torch.long, device=self.device)
        return bt[lg // self.bs] * self.bs + lg % self.bs

    def _rows(self, specs: list[SeqSpec]):
        """The forward's query rows: token ids, positions, the slots their K/V go to, the
        attention backend, whether each is a blend candidate, and its sequence."""
        dev = self.device
        ids, qpos, wslots, logical, cand, seq_of_row = [], [], [], [], [], []
        for i, s in enumerate(specs):
            ids += [s.token_ids[j] for j in s.query_slots]
            qpos += [s.positions[j] for j in s.query_slots]
            logical.append(torch.tensor(s.query_slots, dtype=torch.long, device=dev))
            wslots.append(self._slots(s.block_table, s.query_slots))
            cset = set(s.blend_candidates)
            cand += [j in cset for j in s.query_slots]
            seq_of_row += [i] * len(s.query_slots)
        rows_pos = torch.tensor(qpos, dtype=torch.long, device=dev)
        attn = self.build_attention(specs, rows_pos, logical, self.bs, self.rope, self.model.scale, dev)
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.cat(wslots), attn,
                torch.tensor(cand, dtype=torch.bool, device=dev), torch.tensor(seq_of_row, device=dev))

    def forward(self, specs: list[SeqSpec], blend: bool = False) -> torch.Tensor:
        """Returns the final hidden state of each spec's last query slot."""
        dev = self.device
        input_ids, wslots, attn, cand, seq_of_row = self._rows(specs)
        hook = self._blend_hook(specs, cand, seq_of_row) if blend else None
        hidden, rows = self.model(input_ids, wslots, attn, self.k_cache, self.v_cache,
                                  blend_layer=self.blend[1] if blend else -1,
                                  blend_hook=hook)
        last_rows = torch.tensor(list(itertools.accumulate(len(s.query_slots) for s in specs)), device=dev) - 1
        return hidden[torch.searchsorted(rows, last_rows)]

    def _blend_hook(self, specs: list[SeqSpec], cand: torch.Tensor, seq_of_row: torch.Tensor):
        """CacheBlend's selection: at the check layer keep every non-candidate row
        and, per sequence, the ``ratio`` of candidate (reused chunk) tokens whose
        fresh K deviates most from the cached K."""
        ratio, layer = self.blend
        self.last_blend_selected = []
        starts = list(itertools.accumulate((len(s.query_slots) for s in specs), initial=0))

        def hook(k: torch.Tensor, write_slots: torch.Tensor) -> torch.Tensor:
            dev = (k.float() - self.k_cache[layer][write_slots].float()).pow(2).sum(dim=(1, 2))
            keep_mask = ~cand
            for i, s in enumerate(specs):
                rows = torch.nonzero(cand & (seq_of_row == i)).flatten()
                n = math.ceil(ratio * rows.numel())
                chosen = rows[torch.topk(dev[rows], n).indices] if n else rows[:0]
                keep_mask[chosen] = True
                self.last_blend_selected.append([s.query_slots[r - starts[i]] for r in chosen.tolist()])
            return torch.nonzero(keep_mask).flatten()
        return hook

    def select_blocks(self, specs: list[SeqSpec], candidates: list[list[int]], counts: list[int]) -> list[list[int]]:
        """MEPIC's block selection, per sequence: the ``counts[i]`` of its candidate (shared)
        blocks whose K at the check layer, computed in this context, deviates most from
        their canonical pages. A forward up to the check layer only: the sequence's own
        query rows are written as usual (the prefill rewrites them); the candidate rows
        are never written, since their pages are shared. Below the check layer they read
        the canonical K/V of each other, which at layer 0 is exact (a NoPE projection of
        the token alone)."""
        layer = self.cfg.reuse.block_selection()[1]
        if layer >= self.mcfg.num_layers:
            raise ValueError(f"mepic check_layer {layer} is not a layer of this {self.mcfg.num_layers}-layer model")
        bs, probes, owner = self.bs, [], []
        for s, blocks in zip(specs, candidates):
            cand = sorted(j for b in blocks for j in range(b * bs, (b + 1) * bs) if s.positions[j] >= 0)
            probes.append(SeqSpec(s.token_ids, s.positions, s.block_table, sorted(set(s.query_slots).union(cand)),
                                  blend_candidates=cand))
            owner.append({j: j // bs for j in cand})
        input_ids, wslots, attn, cand, _ = self._rows(probes)
        read_slots = wslots[cand]
        wslots = wslots.masked_fill(cand, -1)
        scores: list[torch.Tensor] = []

        def hook(k: torch.Tensor, _slots: torch.Tensor) -> torch.Tensor:
            dev = (k[cand].float() - self.k_cache[layer][read_slots].float()).pow(2).sum(dim=(1, 2))
            scores.append(dev)
            raise _ProbeDone

        try:
            self.model(input_ids, wslots, attn, self.k_cache, self.v_cache, blend_layer=layer, blend_hook=hook)
        except _ProbeDone:
            pass
        picked, start = [], 0
        for p, own, n in zip(probes, owner, counts):
            rows = scores[0][start:start + len(p.blend_candidates)]
            start += len(p.blend_candidates)
            blocks = sorted(set(own.values()))
            index = {b: i for i, b in enumerate(blocks)}
            of_row = torch.tensor([index[own[j]] for j in p.blend_candidates])
            per_block = torch.zeros(len(blocks)).index_add_(0, of_row, rows.cpu())
            sizes = torch.zeros(len(blocks)).index_add_(0, of_row, torch.ones(len(rows)))
            top = torch.topk(per_block / sizes, min(n, len(blocks))).indices.tolist()
            picked.append(sorted(blocks[i] for i in top))
        self.last_selected_blocks = picked
        return picked

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    # -- whole blocks in and out (the object-store tier) ----------------------
    def export_blocks(self, blocks: list[int]) -> torch.Tensor:
        """K and V of the given blocks, stacked: [2, layers, blocks * block_size, kv_heads, head_dim]."""
        slots = self._slots(blocks, list(range(len(blocks) * self.bs)))
        return torch.stack((self.k_cache[:, slots], self.v_cache[:, slots]))

    def import_blocks(self, blocks: list[int], kv: torch.Tensor) -> None:
        slots = self._slots(blocks, list(range(len(blocks) * self.bs)))
        kv = kv.to(self.device, non_blocking=True)
        self.k_cache[:, slots] = kv[0]
        self.v_cache[:, slots] = kv[1]

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k_cache.shape[0] * self.bs * self.k_cache[0, 0].numel() * self.k_cache.element_size()

    # -- host copies for the EPIC / CacheBlend baselines --------------------
    def take_host_copy(self, chunk_hash: str, block_table: list[int], num_slots: int) -> None:
        slots = self._slots(block_table, list(range(num_slots)))
        self.host_copies[chunk_hash] = (self.k_cache[:, slots].clone(), self.v_cache[:, slots].clone())

    def copy_in(self, chunk_hash: str, block_table: list[int]) -> None:
        k, v = self.host_copies[chunk_hash]
        slots = self._slots(block_table, list(range(k.shape[1])))
        self.k_cache[:, slots] = k
        self.v_cache[:, slots] = v

    def drop_host_copies(self, hashes: list[str]) -> None:
        for h in hashes:
            self.host_copies.pop(h, None)
