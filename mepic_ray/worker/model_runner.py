"""Owns the model and the KV tensors; turns sequence specs into one forward."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from mepic_ray.kernels import RopeTable
from mepic_ray.worker.attention import TorchAttention, TritonAttention, resolve_backend
from mepic_ray.worker.cascade_plan import slot_offsets
from mepic_ray.config import EngineConfig, ModelConfig
from mepic_ray.worker.model import LlamaForCausalLM


@dataclass
class SeqSpec:
    """One sequence of a forward: which logical slots to compute, over which blocks."""
    token_ids: list[int]
    positions: list[int]           # RoPE position of every logical slot, -1 for padding
    block_table: list[int]
    query_slots: list[int]
    # Runs of shared chunk pages: (physical blocks, first logical slot, chunk-local
    # position of that slot); the same pages at the same local position are the same bytes.
    shared_runs: list[tuple[tuple[int, ...], int, int]] = field(default_factory=list)
    # Slots whose keys are stored at chunk-local positions (``KVCacheManager.local_spans``):
    # (first logical slot, end slot, how far their positions here lie past the local ones).
    local_spans: list[tuple[int, int, int]] = field(default_factory=list)


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
        selection = cfg.reuse.selection()
        if selection is not None and not 0 <= selection[1] < mcfg.num_layers:
            raise ValueError(f"{cfg.mode} check_layer {selection[1]} is not a layer of this "
                             f"{mcfg.num_layers}-layer model")

    def _slots(self, block_table: list[int], logical: list[int]) -> torch.Tensor:
        bt = torch.tensor(block_table, dtype=torch.long, device=self.device)
        lg = torch.tensor(logical, dtype=torch.long, device=self.device)
        return bt[lg // self.bs] * self.bs + lg % self.bs

    def _rows(self, specs: list[SeqSpec]):
        """The forward's query rows: token ids, the slots their K/V go to, and the attention backend."""
        dev = self.device
        ids, qpos, wslots, logical, offsets, qoff = [], [], [], [], [], []
        for s in specs:
            ids += [s.token_ids[j] for j in s.query_slots]
            qpos += [s.positions[j] for j in s.query_slots]
            ql = torch.tensor(s.query_slots, dtype=torch.long)
            offsets.append(slot_offsets(s.positions, s.local_spans, s.query_slots[-1] + 1))
            qoff.append(offsets[-1][ql])
            logical.append(ql.to(dev))
            wslots.append(self._slots(s.block_table, s.query_slots))
        rows_pos = torch.tensor(qpos, dtype=torch.long, device=dev)
        rows_stored = rows_pos - torch.cat(qoff).to(dev)
        attn = self.build_attention(specs, offsets, rows_pos, rows_stored, logical, self.bs, self.rope,
                                    self.model.scale, dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), torch.cat(wslots), attn

    def forward(self, specs: list[SeqSpec]) -> torch.Tensor:
        """Returns the final hidden state of each spec's last query slot."""
        input_ids, wslots, attn = self._rows(specs)
        hidden = self.model(input_ids, wslots, attn, self.k_cache, self.v_cache)
        last_rows = torch.tensor(list(itertools.accumulate(len(s.query_slots) for s in specs)),
                                 device=self.device) - 1
        return hidden[last_rows]

    def probe(self, specs: list[SeqSpec], candidates: list[list[int]], write: list[bool],
              layer: int) -> list[list[float]]:
        """A selection probe, per sequence: how far each candidate slot's K at ``layer``,
        computed in this context, deviates from the K cached there (squared L2, in the
        candidates' order). A forward up to that layer over the query and candidate
        slots: the query rows are written as usual (the prefill rewrites them), the
        candidate rows only where ``write`` says their pages are private. Below the layer
        the candidates read each other's cached K/V, which at layer 0 is exact (a
        projection of the token alone, rotated at the slot's stored position)."""
        rows = [SeqSpec(s.token_ids, s.positions, s.block_table, sorted(set(s.query_slots).union(c)),
                        local_spans=s.local_spans) for s, c in zip(specs, candidates)]
        input_ids, wslots, attn = self._rows(rows)
        is_cand = torch.tensor([j in cs for r, c in zip(rows, candidates) for cs in (set(c),) for j in r.query_slots],
                               dtype=torch.bool, device=self.device)
        shared = torch.tensor([not w for r, w in zip(rows, write) for _ in r.query_slots],
                              dtype=torch.bool, device=self.device)
        read_slots = wslots[is_cand]
        k = self.model(input_ids, wslots.masked_fill(is_cand & shared, -1), attn, self.k_cache, self.v_cache,
                       stop_layer=layer)
        dev = (k[is_cand].float() - self.k_cache[layer][read_slots].float()).pow(2).sum(dim=(1, 2)).tolist()
        out, start = [], 0
        for c in candidates:
            out.append(dev[start:start + len(c)])
            start += len(c)
        return out

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
