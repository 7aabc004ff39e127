"""Admission and page assignment for one request (MEPIC's Algorithm 1).

For each logical block of a request's layout the manager decides where its KV
comes from: a prefix-cache hit, a chunk's canonical page (shared), a private
copy of a chunk (EPIC / CacheBlend baselines), or a fresh private page that is
computed in context. It admits a request only if free pages plus evictable
chunk pages cover everything it will ever need, decode tokens included, so the
pool can never run out mid-flight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mepic_ray.core.block_pool import BlockPool
from mepic_ray.core.chunk_coordinator import ChunkCoordinator, ChunkEntry
from mepic_ray.config import EngineConfig
from mepic_ray.hashing import PAD_TOKEN
from mepic_ray.core.request import Request


class RequestTooLargeError(ValueError):
    """The request can never fit in the KV pool, even with everything else evicted."""


@dataclass
class CompileJob:
    """Compute a chunk standalone (attending only to itself) into ``block_table``."""
    chunk_hash: str
    padded_ids: tuple[int, ...]
    block_table: list[int]
    entry: ChunkEntry | None = None          # canonical chunk (naive / mepic)
    temp_blocks: list[int] = field(default_factory=list)
    snapshot: bool = False                   # keep a host copy (epic / cacheblend)
    load: object = None                      # KV tensor from the store tier: copy in instead of computing


@dataclass
class Plan:
    allocs: int          # pages taken from the free queue now
    revived: int         # prefix hits that sit in the free queue
    reserve: int
    query_tokens: int
    reused: list[ChunkEntry]
    new_chunks: list[int]
    hits: dict[int, int]
    keep: set[str]


class KVCacheManager:
    def __init__(self, cfg: EngineConfig, num_blocks: int):
        self.cfg = cfg
        self.bs = cfg.block_size
        self.pool = BlockPool(num_blocks, enable_caching=cfg.prefix_caching)
        self.chunks = ChunkCoordinator(self.pool)
        self.reserved = 0
        self.shared_chunks = cfg.mode in ("naive", "mepic")
        # Chunk pages exclude the leading block(s) in MEPIC: they are always recomputed in context.
        self.skip_first = cfg.mepic_recompute_blocks if cfg.mode == "mepic" else 0

    # -- sizing -------------------------------------------------------------
    def decode_reserve(self, req: Request) -> int:
        total = -(-(req.num_prompt_slots + req.params.max_tokens) // self.bs)
        return total - len(req.layout.block_kinds)

    def worst_case_blocks(self, req: Request) -> int:
        extra = len(req.layout.chunks) * self.skip_first   # compile scratch
        return len(req.layout.block_kinds) + self.decode_reserve(req) + extra

    def check_fits(self, req: Request) -> None:
        need = self.worst_case_blocks(req)
        if need > self.pool.num_blocks:
            raise RequestTooLargeError(
                f"request needs {need} KV blocks of {self.bs} tokens ({req.num_prompt_slots} prompt slots "
                f"+ {req.params.max_tokens} max_tokens) but the pool has only {self.pool.num_blocks}")

    def page_tokens(self, padded_ids: tuple[int, ...]) -> int:
        """Real tokens a chunk's canonical pages hold (MEPIC keeps no first block)."""
        return sum(1 for t in padded_ids[self.skip_first * self.bs:] if t != PAD_TOKEN)

    # -- admission ----------------------------------------------------------
    def plan(self, req: Request) -> Plan | None:
        lay, mode = req.layout, self.cfg.mode
        reused, new_chunks, keep, new_hashes = [], [], set(), set()
        allocs = revived = 0
        for ci, c in enumerate(lay.chunks):
            if self.shared_chunks:
                if c.num_blocks <= self.skip_first:
                    continue   # a chunk within the recompute window is all recompute: nothing to share
                e = self.chunks.lookup(c.chunk_hash, c.padded_ids)
                if e is None:
                    new_chunks.append(ci)
                    if c.chunk_hash not in new_hashes:   # the same document twice compiles once
                        new_hashes.add(c.chunk_hash)
                        # canonical pages, plus the first-block scratch in MEPIC unless loaded
                        allocs += c.num_blocks - (self.skip_first if c.chunk_hash in req.preloaded else 0)
                else:
                    reused.append(e)
                    keep.add(c.chunk_hash)
            else:
                allocs += c.num_blocks     # private copy per request
        hits: dict[int, int] = {}
        last = len(lay.block_kinds) - 1
        for b in range(last + 1):
            if b in lay.chunk_of_block:
                ci, j = lay.chunk_of_block[b]
                if not self.shared_chunks or j >= self.skip_first and lay.chunks[ci].num_blocks > self.skip_first:
                    continue
            h = lay.block_hashes[b] if b < last else None
            phys = self.pool.lookup(h) if h else None
            if phys is not None:
                hits[b] = phys
                revived += self.pool.ref_cnt[phys] == 0   # reviving takes it off the free queue
            else:
                allocs += 1
        reserve = self.decode_reserve(req)
        available = self.pool.num_free - self.reserved + self.chunks.evictable_blocks(keep)
        if allocs + revived + reserve > available:
            return None
        query = sum(1 for b in range(last + 1) if b not in hits and b not in lay.chunk_of_block)
        return Plan(allocs, revived, reserve, query * self.bs, reused, new_chunks, hits, keep)

    def commit(self, req: Request, plan: Plan, host_store: dict, pending: dict[str, CompileJob]) -> list[CompileJob]:
        """Take the pages the plan promised and fill in the request's block table,
        query slots and stats. Returns the compile jobs it triggered."""
        lay, bs, mode = req.layout, self.bs, self.cfg.mode
        for e in plan.reused:
            self.chunks.acquire(e)
        req.held_chunks = list(plan.reused)
        self.pool.touch(list(plan.hits.values()))
        self.chunks.evict_until(plan.allocs, plan.keep)
        jobs: list[CompileJob] = []
        entry_of: dict[int, ChunkEntry] = {}
        for e in plan.reused:
            for ci, c in enumerate(lay.chunks):
                if c.chunk_hash == e.chunk_hash:
                    entry_of[ci] = e
        req.stats.chunks_pool = len({e.chunk_hash for e in plan.reused})
        created: dict[str, ChunkEntry] = {}
        for ci in plan.new_chunks:
            c = lay.chunks[ci]
            if c.chunk_hash in created:
                entry_of[ci] = created[c.chunk_hash]
                self.chunks.acquire(entry_of[ci])
                req.held_chunks.append(entry_of[ci])
                continue
            e = created[c.chunk_hash] = self.chunks.create(c.chunk_hash, c.padded_ids, c.num_blocks - self.skip_first)
            loaded = req.preloaded.pop(c.chunk_hash, None)
            if loaded is not None:
                jobs.append(CompileJob(c.chunk_hash, c.padded_ids, e.blocks, e, load=loaded))
                req.stats.loaded_tokens += self.page_tokens(c.padded_ids)
                req.stats.chunks_store += 1
            else:
                temp = self.pool.allocate(self.skip_first)
                jobs.append(CompileJob(c.chunk_hash, c.padded_ids, temp + e.blocks, e, temp))
                self._mark_compiled(req, c)
                req.stats.chunks_miss += 1
            req.held_chunks.append(e)
            entry_of[ci] = e
        req.preloaded = {}   # unused loads (the chunk became resident meanwhile) are dropped
        table: list[int] = [-1] * len(lay.block_kinds)
        private: list[int] = []
        computed: list[int] = []
        for b in range(len(table)):
            if b in plan.hits:
                table[b] = plan.hits[b]
                private.append(table[b])
                continue
            if b in lay.chunk_of_block:
                ci, j = lay.chunk_of_block[b]
                if ci in entry_of and j >= self.skip_first:
                    table[b] = entry_of[ci].blocks[j - self.skip_first]
                    continue
            table[b] = self.pool.allocate(1)[0]
            private.append(table[b])
            if b not in lay.chunk_of_block or self.shared_chunks:
                computed.append(b)
        if not self.shared_chunks:
            jobs += self._private_copies(req, table, host_store, pending)
        req.block_table, req.private_blocks, req.computed_blocks = table, private, computed
        req.reserved_blocks = plan.reserve
        self.reserved += plan.reserve
        self._set_queries(req)
        self.pool.update_peak(self.chunks.idle_blocks)
        return jobs

    def _private_copies(self, req: Request, table: list[int], host_store: dict,
                        pending: dict[str, CompileJob]) -> list[CompileJob]:
        """EPIC / CacheBlend: every request gets its own copy of each chunk's KV,
        from the host store, or compiled straight into its pages on first sight."""
        jobs = []
        req.copies = []
        for c in req.layout.chunks:
            blocks = table[c.first_block:c.first_block + c.num_blocks]
            if c.chunk_hash in host_store or c.chunk_hash in pending:
                req.copies.append((c.chunk_hash, blocks))
            else:
                job = CompileJob(c.chunk_hash, c.padded_ids, blocks, snapshot=True)
                pending[c.chunk_hash] = job
                jobs.append(job)
                self._mark_compiled(req, c)
        return jobs

    def _mark_compiled(self, req: Request, c) -> None:
        req.compiled_slots.update(c.real_slots(self.bs))
        req.stats.compiled_tokens += c.num_tokens

    def _set_queries(self, req: Request) -> None:
        lay, bs, mode = req.layout, self.bs, self.cfg.mode
        slots = [s for b in req.computed_blocks for s in range(b * bs, min((b + 1) * bs, req.num_prompt_slots))
                 if lay.token_ids[s] != PAD_TOKEN]
        chunk_slots: list[int] = []
        if mode == "epic":
            for c in lay.chunks:
                chunk_slots += c.real_slots(bs)[:self.cfg.epic_recompute_tokens]
        elif mode == "cacheblend":
            for c in lay.chunks:
                chunk_slots += c.real_slots(bs)
            req.blend_candidates = chunk_slots
        req.query_slots = sorted(slots + chunk_slots)
        if mode != "cacheblend":   # CacheBlend learns its recompute set inside the forward
            req.set_computed(req.query_slots, bs)

    # -- decode and release -------------------------------------------------
    def append_slot(self, req: Request) -> None:
        """Make sure the request's newest slot has a page (from its reservation)."""
        if req.num_slots <= len(req.block_table) * self.bs:
            return
        if req.reserved_blocks <= 0:
            raise RuntimeError(f"request {req.request_id} outgrew its reservation")
        req.reserved_blocks -= 1
        self.reserved -= 1
        if self.pool.num_free == 0:
            self.chunks.evict_until(1, set())
        b = self.pool.allocate(1)[0]
        req.block_table.append(b)
        req.private_blocks.append(b)
        self.pool.update_peak(self.chunks.idle_blocks)

    def register_prefix(self, req: Request) -> None:
        lay = req.layout
        for b in req.computed_blocks:
            if b < len(lay.block_hashes) and lay.block_hashes[b] is not None:
                self.pool.register(req.block_table[b], lay.block_hashes[b])

    def finish_compile(self, job: CompileJob) -> None:
        if job.entry is not None:
            job.entry.ready = True
        if job.temp_blocks:
            self.pool.free(job.temp_blocks)

    def reset_cache(self) -> None:
        """Evict every idle chunk and forget unreferenced prefix pages."""
        self.chunks.evict_until(self.pool.num_blocks + 1, set(), demote=False)
        self.pool.drop_cached_hashes()

    def free(self, req: Request) -> None:
        self.pool.free(req.private_blocks)
        for e in req.held_chunks:
            self.chunks.release(e)
        self.reserved -= req.reserved_blocks
        req.private_blocks, req.held_chunks, req.reserved_blocks = [], [], 0
