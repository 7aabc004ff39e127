"""The engine's side of the object-store tier: what the tier holds must match this
engine's block layout, which chunks a request lacks, and sending evicted or freshly
compiled chunks down. The engine carries out the scheduler's demotions through it."""
from __future__ import annotations

import torch

from mepic_ray.core.request import Request
from mepic_ray.tier.kv_codec import KV_FORMAT, ChunkWant
from mepic_ray.tier.store_client import StoreClient


class EngineTier:
    def __init__(self, store_cfg, engine):
        mc, cfg = engine.model_config, engine.cfg
        self.kv, self.runner = engine.kv, engine.runner
        self.shape = engine.chunk_kv_shape
        # Stored with every object and compared on load: bytes from another layout never enter the pool.
        layout = {"kv_format": KV_FORMAT, "block_size": cfg.block_size, "recompute": cfg.reuse.window(),
                  "dtype": cfg.dtype, "slot_shape": [mc.num_layers, mc.num_kv_heads, mc.head_dim]}
        self.client = StoreClient(store_cfg, engine.fingerprint, layout)

    def demote(self, chunk_hash: str, padded_ids: tuple[int, ...], shared_tokens: int, kv: torch.Tensor) -> None:
        self.client.demote(chunk_hash, padded_ids, shared_tokens, kv)

    def wants(self, req: Request) -> list[ChunkWant]:
        """The request's shared chunks not resident here: candidates to load from the store.
        Called off the engine thread: a membership test of the resident map is atomic."""
        seen, wants = set(), []
        for c in req.layout.chunks:
            if c.chunk_hash in seen or c.chunk_hash in self.kv.chunks.entries or not self.kv.is_shared(c):
                continue
            seen.add(c.chunk_hash)
            wants.append(ChunkWant(c.chunk_hash, c.padded_ids, self.kv.shared_tokens(c.padded_ids),
                                   self.shape(c.num_blocks - self.kv.recomputed_blocks(c.padded_ids))))
        return wants

    def export_chunk(self, c) -> dict | None:
        """A resident chunk's canonical KV (``kv``) and its store ``meta``; ``{}`` when it has
        nothing to share (all of it is recomputed in context); None when it is not
        resident. Run on the engine thread, between steps."""
        if not self.kv.is_shared(c):
            return {}
        e = self.kv.chunks.entries.get(c.chunk_hash)
        if e is None or not e.ready:
            return None
        kv = self.runner.export_blocks(e.blocks)
        return {"kv": kv, "meta": self.client.meta(c.chunk_hash, e.token_ids, self.kv.shared_tokens(e.token_ids), kv)}

    def demote_chunks(self, hashes: list[str]) -> int:
        """Queue these resident chunks for the store (a replica about to stop). Engine thread."""
        n = 0
        for h in hashes:
            e = self.kv.chunks.entries.get(h)
            if e is not None and e.ready:
                self.demote(h, e.token_ids, self.kv.shared_tokens(e.token_ids), self.runner.export_blocks(e.blocks))
                n += 1
        return n
