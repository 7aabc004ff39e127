"""Admission and block assignment for one request (MEPIC's Algorithm 1), and the
per-request KV state (block table, held chunks, reservation), as vLLM's KV cache
manager keeps ``req_to_blocks``.

``plan()`` decides where each logical block's KV comes from: a prefix-cache hit, a
chunk's canonical block (shared), or a fresh private block that is computed in
context or filled from a chunk's copy. It admits a request only if free blocks plus
evictable chunk blocks cover everything it will ever need, decode tokens included,
so the pool can never run out mid-flight. ``commit()`` carries the plan out.
"""
from __future__ import annotations

import math

from mepic_ray.core.block_pool import BlockPool
from mepic_ray.core.chunk_coordinator import ChunkCoordinator, ChunkEntry
from mepic_ray.core.host_copies import HostCopies
from mepic_ray.core.kv_state import COMPUTE, COPY, HIT, SHARED, Plan, RequestKV, RequestTooLargeError
from mepic_ray.core.layout import ChunkSpan
from mepic_ray.core.policy import ReusePolicy
from mepic_ray.core.request import Request
from mepic_ray.core.work import CompileJob, Demotion, LoadJob, ScheduledSeq, SchedulerOutput
from mepic_ray.hashing import PAD_TOKEN

class KVCacheManager:
    def __init__(self, policy: ReusePolicy, block_size: int, num_blocks: int, bytes_per_block: int):
        self.policy, self.bs = policy, block_size
        self.pool = BlockPool(num_blocks, enable_caching=policy.prefix_caching)
        self.chunks = ChunkCoordinator(self.pool)
        self.copies = HostCopies(getattr(policy.options, "host_copy_bytes", 0), bytes_per_block, block_size)
        self.requests: dict[str, RequestKV] = {}
        self.reserved = 0
        # Set when an object-store tier sits below the pool.
        self.demote_evicted = False
        self.publish_compiled = False
        self.demotions: list[Demotion] = []

    # -- sizing -------------------------------------------------------------
    def decode_reserve(self, req: Request) -> int:
        total = -(-(req.num_prompt_slots + req.max_new_tokens) // self.bs)
        return total - len(req.layout.block_kinds)

    def recomputed_blocks(self, padded_ids: tuple[int, ...]) -> int:
        """A shared chunk's leading blocks that are computed in context, never shared."""
        return self.policy.recomputed_blocks(padded_ids, self.bs)

    def _scratch(self, layout) -> int:
        # Compiling a new chunk also computes its leading blocks, into scratch blocks; a
        # block a probe picks takes a private page beside its shared one.
        lead = [min(self.recomputed_blocks(c.padded_ids), c.num_blocks) for c in layout.chunks]
        selection = self.policy.block_selection()
        shared = sum(c.num_blocks for c in layout.chunks) - sum(lead)
        return sum(lead) + (math.ceil(selection[0] * shared) if selection else 0)

    def worst_case_blocks(self, req: Request) -> int:
        return len(req.layout.block_kinds) + self.decode_reserve(req) + self._scratch(req.layout)

    def room_after(self, layout) -> int:
        """How many tokens can follow this prompt layout in a pool of this size (the
        worst case: every block private, every reused chunk's scratch blocks held)."""
        return (self.pool.num_blocks - self._scratch(layout)) * self.bs - len(layout.token_ids)

    def check_fits(self, req: Request) -> None:
        need = self.worst_case_blocks(req)
        if need > self.pool.num_blocks:
            raise RequestTooLargeError(
                f"request needs {need} KV blocks of {self.bs} tokens ({req.num_prompt_slots} prompt slots "
                f"+ {req.max_new_tokens} new tokens) but the pool has only {self.pool.num_blocks}")

    def shared_tokens(self, padded_ids: tuple[int, ...]) -> int:
        """Real tokens a chunk's canonical blocks hold (MEPIC keeps no leading block)."""
        return sum(1 for t in padded_ids[self.recomputed_blocks(padded_ids) * self.bs:] if t != PAD_TOKEN)

    def is_shared(self, c: ChunkSpan) -> bool:
        # A chunk within the recompute window is all recompute: nothing to share.
        return self.policy.shares_chunks and c.num_blocks > self.recomputed_blocks(c.padded_ids)

    # -- admission ----------------------------------------------------------
    def plan(self, req: Request) -> Plan | None:
        lay = req.layout
        reused: dict[str, ChunkEntry] = {}
        new_chunks: dict[str, ChunkSpan] = {}
        allocs = revived = 0
        host_copied = set()
        for c in lay.chunks:
            if not self.policy.shares_chunks and self.copies.lookup(c.chunk_hash, c.padded_ids):
                host_copied.add(c.chunk_hash)
            if not self.is_shared(c):
                continue
            e = self.chunks.lookup(c.chunk_hash, c.padded_ids)
            if e is not None:
                reused[c.chunk_hash] = e
            elif c.chunk_hash not in new_chunks:   # the same document twice is created once
                new_chunks[c.chunk_hash] = c
                # canonical blocks, plus the leading-block scratch of its compile unless loaded
                allocs += c.num_blocks - (self.recomputed_blocks(c.padded_ids) if c.chunk_hash in req.fetched_kv
                                          else 0)
        sources: list[tuple] = []
        last = len(lay.block_kinds) - 1
        for b in range(last + 1):
            where = lay.chunk_of_block.get(b)
            if where is not None:
                c = lay.chunks[where[0]]
                r = self.recomputed_blocks(c.padded_ids)
                if self.is_shared(c) and where[1] >= r:
                    sources.append((SHARED, c.chunk_hash, where[1] - r))
                    continue
                if not self.policy.shares_chunks:
                    sources.append((COPY,))
                    allocs += 1
                    continue
            h = lay.block_hashes[b] if b < last else None   # the last block makes the logits
            phys = self.pool.lookup(h) if h else None
            if phys is not None:
                sources.append((HIT, phys))
                revived += self.pool.ref_cnt[phys] == 0     # reviving takes it off the free queue
            else:
                sources.append((COMPUTE,))
                allocs += 1
        selection = self.policy.block_selection()
        selected = math.ceil(selection[0] * sum(1 for s in sources if s[0] == SHARED)) if selection else 0
        allocs += selected
        reserve = self.decode_reserve(req)
        available = self.pool.num_free - self.reserved + self.chunks.evictable_blocks(set(reused))
        if allocs + revived + reserve > available:
            return None
        query = sum(1 for b, s in enumerate(sources) if s[0] == COMPUTE and b not in lay.chunk_of_block)
        return Plan(sources, reused, new_chunks, host_copied, allocs, revived, reserve,
                    (query + selected) * self.bs, selected)

    def commit(self, req: Request, plan: Plan, out: SchedulerOutput) -> ScheduledSeq:
        """Take the blocks the plan promised, add the chunk work it implies to ``out``
        and return the request's prefill."""
        lay, bs = req.layout, self.bs
        kv = self.requests[req.request_id] = RequestKV(reserved_blocks=plan.reserve)
        self.reserved += plan.reserve
        hits = [s[1] for s in plan.sources if s[0] == HIT]
        self.pool.touch(hits)
        self._evict(plan.allocs, set(plan.reused))
        entries = dict(plan.reused)
        compiled: set[int] = set()
        st = req.stats
        st.chunks_pool = len(plan.reused)
        for h, c in plan.new_chunks.items():
            r = self.recomputed_blocks(c.padded_ids)
            e = entries[h] = self.chunks.create(h, c.padded_ids, c.num_blocks - r)
            fetched = req.fetched_kv.get(h)
            if fetched is not None:
                out.loads.append(LoadJob(e, fetched))
                st.loaded_tokens += self.shared_tokens(c.padded_ids)
                st.chunks_store += 1
            else:
                scratch = self.pool.allocate(r)
                out.compiles.append(CompileJob(h, c.padded_ids, scratch + e.blocks, e, scratch,
                                               publish=self.publish_compiled))
                compiled.update(c.real_slots(bs))
                st.compiled_tokens += c.num_tokens
                st.chunks_miss += 1
        req.fetched_kv = {}   # unused loads (the chunk became resident meanwhile) are dropped
        # One reference per occurrence (a chunk used twice is released twice); a new
        # chunk's first occurrence holds the reference it was created with.
        for c in lay.chunks:
            if c.chunk_hash in entries:
                if plan.new_chunks.get(c.chunk_hash) is not c:
                    self.chunks.acquire(entries[c.chunk_hash])
                kv.held_chunks.append(entries[c.chunk_hash])
        for b, s in enumerate(plan.sources):
            if s[0] == HIT:
                kv.block_table.append(s[1])
                kv.private_blocks.append(s[1])
            elif s[0] == SHARED:
                kv.block_table.append(entries[s[1]].blocks[s[2]])
            else:
                blk = self.pool.allocate(1)[0]
                kv.block_table.append(blk)
                kv.private_blocks.append(blk)
                if s[0] == COMPUTE:
                    kv.computed_blocks.append(b)
        if not self.policy.shares_chunks:
            compiled |= self.copies.fill(req, kv.block_table, plan.host_copied, out)
        kv.spare_blocks = self.pool.allocate(plan.selected)
        kv.private_blocks += kv.spare_blocks
        self.pool.update_peak(self.chunks.idle_blocks)
        seq = self._prefill(req, kv, frozenset(compiled))
        if plan.selected:
            seq.probe_blocks = [b for b, s in enumerate(plan.sources) if s[0] == SHARED]
            seq.num_selected = plan.selected
        return seq

    def recompute_selected(self, seq: ScheduledSeq, blocks: list[int]) -> None:
        """The probe picked these shared blocks: they move to the request's spare private
        pages and are computed in context by this step's prefill."""
        req, bs = seq.request, self.bs
        kv = self.requests[req.request_id]
        if len(blocks) > len(kv.spare_blocks):
            raise RuntimeError(f"{len(blocks)} blocks picked but {len(kv.spare_blocks)} spare pages reserved")
        for b in blocks:
            kv.block_table[b] = kv.spare_blocks.pop()
            kv.computed_blocks.append(b)
        slots = [s for b in blocks for s in range(b * bs, (b + 1) * bs) if req.layout.token_ids[s] != PAD_TOKEN]
        seq.query_slots = sorted(set(seq.query_slots).union(slots))
        seq.probe_blocks = []
        seq.account(seq.query_slots, req.layout.chunk_of_block, bs)

    def _prefill(self, req: Request, kv: RequestKV, compiled: frozenset) -> ScheduledSeq:
        lay, bs = req.layout, self.bs
        slots = [s for b in kv.computed_blocks for s in range(b * bs, min((b + 1) * bs, req.num_prompt_slots))
                 if lay.token_ids[s] != PAD_TOKEN]
        chunk_slots = [s for c in lay.chunks for s in self.policy.recompute_slots(c, bs)]
        blend = self.policy.blend() is not None
        seq = ScheduledSeq(req, kv.block_table, sorted(slots + chunk_slots), chunk_slots if blend else [], compiled)
        if not blend:   # CacheBlend learns its recompute set inside the forward
            seq.account(seq.query_slots, lay.chunk_of_block, bs)
        return seq

    # -- eviction and the tier -------------------------------------------------
    def _evict(self, num_free: int, keep: set[str]) -> None:
        for e in self.chunks.evict_until(num_free, keep):
            if self.demote_evicted:
                self.demotions.append(Demotion(e.chunk_hash, e.token_ids, self.shared_tokens(e.token_ids),
                                               list(e.blocks)))

    def take_demotions(self) -> list[Demotion]:
        out, self.demotions = self.demotions, []
        return out

    def adopt_chunk(self, chunk_hash: str, padded_ids: tuple[int, ...]) -> ChunkEntry | None:
        """A resident (idle, evictable) chunk without a request, for warming a new replica:
        only into free blocks that hold no cached prefix, never by evicting anything."""
        need = len(padded_ids) // self.bs - self.recomputed_blocks(padded_ids)
        if not self.policy.shares_chunks or need < 1 or chunk_hash in self.chunks.entries:
            return None
        if need > self.pool.num_free_uncached() - self.reserved - 1:
            return None
        return self.chunks.create(chunk_hash, padded_ids, blocks=self.pool.allocate_uncached(need))

    def finish_adopt(self, e: ChunkEntry) -> None:
        e.ready = True
        self.chunks.release(e)

    # -- decode and release -------------------------------------------------
    def block_table(self, req: Request) -> list[int]:
        return self.requests[req.request_id].block_table

    def append_slot(self, req: Request) -> None:
        """Make sure the request's newest slot has a block (from its reservation)."""
        kv = self.requests[req.request_id]
        if req.num_slots <= len(kv.block_table) * self.bs:
            return
        if kv.reserved_blocks <= 0:
            raise RuntimeError(f"request {req.request_id} outgrew its reservation")
        kv.reserved_blocks -= 1
        self.reserved -= 1
        if self.pool.num_free == 0:
            self._evict(1, set())
        b = self.pool.allocate(1)[0]
        kv.block_table.append(b)
        kv.private_blocks.append(b)
        self.pool.update_peak(self.chunks.idle_blocks)

    def register_prefix(self, req: Request) -> None:
        lay, kv = req.layout, self.requests[req.request_id]
        for b in kv.computed_blocks:
            if b < len(lay.block_hashes) and lay.block_hashes[b] is not None:
                self.pool.register(kv.block_table[b], lay.block_hashes[b])

    def finish_compile(self, job: CompileJob) -> None:
        if job.entry is not None:
            job.entry.ready = True
        if job.scratch_blocks:
            self.pool.free(job.scratch_blocks)

    def reset_cache(self) -> None:
        """Evict every idle chunk (without demoting it), forget unreferenced prefix
        blocks and drop the host copies."""
        self.chunks.evict_until(self.pool.num_blocks + 1, set())
        self.pool.drop_cached_hashes()
        self.copies.clear()

    def free(self, req: Request) -> None:
        kv = self.requests.pop(req.request_id, None)
        if kv is None:
            return
        self.pool.free(kv.private_blocks)
        for e in kv.held_chunks:
            self.chunks.release(e)
        self.reserved -= kv.reserved_blocks
