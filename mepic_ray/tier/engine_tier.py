"""The engine's side of the object-store tier: publish chunks, find the ones a request
lacks, and adopt stored chunks into the pool. A mixin of ``LLMEngine``: it works on
the engine's pool (``kv``), runner and model config."""
from __future__ import annotations

import torch

from mepic_ray.core.request import Request


class StoreTier:
    def attach_store(self, store_cfg) -> "StoreClient":
        """Put the Ray object-store tier below this engine's pool (shared-chunk modes only)."""
        from mepic_ray.tier.store_client import StoreClient
        if not self.kv.shared_chunks:
            raise ValueError(f"the store tier holds canonical chunk pages; mode {self.cfg.mode!r} has none")
        mc = self.model_config
        layout = {"block_size": self.cfg.block_size, "first_page": self.kv.skip_first, "dtype": self.cfg.dtype,
                  "slot_shape": [mc.num_layers, mc.num_kv_heads, mc.head_dim]}
        self.store = StoreClient(store_cfg, self.fingerprint, layout)
        self.kv.chunks.on_evict = self._demote
        return self.store

    def _demote(self, entry) -> None:
        self.store.demote(entry.chunk_hash, entry.token_ids, self.kv.page_tokens(entry.token_ids),
                          self.runner.export_pages(entry.blocks))

    def chunk_wants(self, req: Request) -> list:
        """The request's chunks whose pages are not resident here: candidates to load from the store."""
        from mepic_ray.tier.store_client import ChunkWant
        if self.store is None:
            return []
        mc, bs = self.model_config, self.cfg.block_size
        seen, wants = set(), []
        for c in req.layout.chunks:
            if c.chunk_hash in seen or c.chunk_hash in self.kv.chunks.entries or c.num_blocks <= self.kv.skip_first:
                continue
            seen.add(c.chunk_hash)
            shape = (2, mc.num_layers, (c.num_blocks - self.kv.skip_first) * bs, mc.num_kv_heads, mc.head_dim)
            wants.append(ChunkWant(c.chunk_hash, c.padded_ids, self.kv.page_tokens(c.padded_ids), shape))
        return wants

    def prefetch(self, req: Request) -> None:
        """Blocking load of the request's missing chunks (offline use; replicas fetch asynchronously)."""
        if self.store is not None:
            req.preloaded = self.store.fetch(self.chunk_wants(req))

    def adopt_chunk(self, meta: dict, kv: torch.Tensor) -> bool:
        """Make a stored chunk resident (idle, evictable) without a request: warming a new replica.
        Only into free pages, never by evicting anything."""
        chunks, bs, mc = self.kv.chunks, self.cfg.block_size, self.model_config
        need = len(meta["token_ids"]) // bs - self.kv.skip_first
        if tuple(kv.shape) != (2, mc.num_layers, need * bs, mc.num_kv_heads, mc.head_dim):
            return False    # not this engine's page layout: never copy it in
        if meta["hash"] in chunks.entries or need > self.kv.pool.num_free - self.kv.reserved - 1:
            return False
        e = chunks.create(meta["hash"], tuple(meta["token_ids"]), need)
        self.runner.import_pages(e.blocks, kv)
        e.ready = True
        chunks.release(e)
        return True
