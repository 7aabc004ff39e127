"""Admission and block assignment for one request (MEPIC's Algorithm 1), and the
per-request KV state (block table, held chunks, the prefill's remaining work), as
vLLM's KV cache manager keeps ``req_to_blocks``.

``plan()`` decides where each logical block's KV comes from: a prefix-cache hit, a
chunk's canonical block (shared), or a fresh private block that is computed in
context or filled from a chunk's copy. A request is admitted when free blocks plus
evictable chunk blocks cover its prompt and a small watermark; decode pages are
taken one at a time as a sequence crosses a block boundary (``grow``), and when the
pool runs dry the scheduler preempts (``preempt``). ``commit()`` carries a plan out.
"""
from __future__ import annotations

from mepic_ray.core import prefill_work
from mepic_ray.core.block_pool import BlockPool
from mepic_ray.core.chunk_coordinator import ChunkCoordinator, ChunkEntry
from mepic_ray.core.host_copies import HostCopies
from mepic_ray.core.kv_state import COMPUTE, COPY, HIT, SHARED, Plan, RequestKV, RequestTooLargeError
from mepic_ray.core.layout import ChunkSpan
from mepic_ray.core.policy import ReusePolicy
from mepic_ray.core.request import Request
from mepic_ray.core.work import CompileJob, Demotion, LoadJob, Probe, SchedulerOutput
from mepic_ray.hashing import PAD_TOKEN


class KVCacheManager:
    def __init__(self, policy: ReusePolicy, block_size: int, num_blocks: int, bytes_per_block: int):
        self.policy, self.bs = policy, block_size
        self.pool = BlockPool(num_blocks, enable_caching=policy.prefix_caching)
        self.chunks = ChunkCoordinator(self.pool)
        self.copies = HostCopies(getattr(policy.options, "host_copy_bytes", 0), bytes_per_block, block_size)
        self.requests: dict[str, RequestKV] = {}
        self.compiling: dict[str, CompileJob] = {}    # shared chunks being compiled, by hash
        # Blocks kept free at admission (as vLLM's watermark) so that running sequences
        # can grow for a while before anything is preempted.
        self.watermark = max(1, num_blocks // 100)
        # Set when an object-store tier sits below the pool.
        self.demote_evicted = False
        self.publish_compiled = False
        self.demotions: list[Demotion] = []

    # -- sizing -------------------------------------------------------------
    def recomputed_blocks(self, padded_ids: tuple[int, ...]) -> int:
        """A shared chunk's leading blocks that are computed in context, never shared."""
        return self.policy.recomputed_blocks(padded_ids, self.bs)

    def _scratch(self, layout) -> int:
        # Compiling a new chunk also computes its leading blocks, into scratch blocks; a
        # block a probe picks takes a private page beside its shared one.
        lead = [min(self.recomputed_blocks(c.padded_ids), c.num_blocks) for c in layout.chunks]
        shared = sum(c.num_blocks for c in layout.chunks) - sum(lead)
        picks = self.policy.num_picked_blocks(shared) if self.policy.shares_chunks and self.policy.selection() else 0
        return sum(lead) + picks

    def room_after(self, layout) -> int:
        """How many tokens can follow this prompt layout in a pool of this size, were the
        request alone in it (every block private, every scratch block held)."""
        return (self.pool.num_blocks - self._scratch(layout)) * self.bs - len(layout.token_ids)

    def check_fits(self, req: Request) -> None:
        need = -(-(req.num_prompt_slots + req.max_new_tokens) // self.bs) + self._scratch(req.layout)
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
    def plan(self, req: Request, watermark: int) -> Plan | None:
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
        shared = sum(1 for s in sources if s[0] == SHARED)
        selected = self.policy.num_picked_blocks(shared) if shared and self.policy.selection() else 0
        allocs += selected
        available = self.pool.num_free + self.chunks.evictable_blocks(set(reused))
        if allocs + revived + watermark > available:
            return None
        return Plan(sources, reused, new_chunks, host_copied, allocs, revived, selected)

    def commit(self, req: Request, plan: Plan, out: SchedulerOutput) -> None:
        """Take the blocks the plan promised, add the loads and copies it implies to
        ``out`` and record the prefill's work: compiles, a probe, slots in context."""
        lay, bs = req.layout, self.bs
        kv = self.requests[req.request_id] = RequestKV()
        hits = [s[1] for s in plan.sources if s[0] == HIT]
        self.pool.touch(hits)
        self._evict(plan.allocs, set(plan.reused))
        entries = dict(plan.reused)
        compiled: set[int] = set()
        first = req.stats.preemptions == 0     # a resumed request's figures stay those of its first prefill
        st = req.stats
        for h, c in plan.new_chunks.items():
            r = self.recomputed_blocks(c.padded_ids)
            e = entries[h] = self.chunks.create(h, c.padded_ids, c.num_blocks - r)
            fetched = req.fetched_kv.get(h)
            if fetched is not None:
                out.loads.append(LoadJob(e, fetched))
                if first:
                    st.loaded_tokens += self.shared_tokens(c.padded_ids)
                    st.chunks_store += 1
            else:
                scratch = self.pool.allocate(r)
                self.compiling[h] = CompileJob(h, c.padded_ids, scratch + e.blocks, e, scratch,
                                               publish=self.publish_compiled)
                compiled.update(c.real_slots(bs))
                if first:
                    st.compiled_tokens += c.num_tokens
                    st.chunks_miss += 1
        if first:
            st.chunks_pool = len(plan.reused)
        req.fetched_kv = {}   # unused loads (the chunk became resident meanwhile) are dropped
        # One reference per occurrence (a chunk used twice is released twice); a new
        # chunk's first occurrence holds the reference it was created with.
        for c in lay.chunks:
            if c.chunk_hash in entries:
                if plan.new_chunks.get(c.chunk_hash) is not c:
                    self.chunks.acquire(entries[c.chunk_hash])
                kv.held_chunks.append(entries[c.chunk_hash])
        # Every compile it reads, whoever started it: a request admitted while another
        # compiles its chunk waits for (and helps finish) that compile.
        kv.compiles = list({h: self.compiling[h] for h in entries if h in self.compiling}.values())
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
            jobs, private_compiled = self.copies.fill(req, kv.block_table, plan.host_copied, out, count=first)
            kv.compiles += jobs
            compiled |= private_compiled
        kv.spare_blocks = self.pool.allocate(plan.selected)
        kv.private_blocks += kv.spare_blocks
        kv.compiled_slots = frozenset(compiled)
        self.pool.update_peak(self.chunks.idle_blocks)
        prefill_work.plan_work(self.policy, self.bs, req, kv, [b for b, s in enumerate(plan.sources) if s[0] == SHARED])

    def take_probe(self, req: Request) -> Probe:
        return prefill_work.take_probe(self.policy, self.bs, req, self.requests[req.request_id])

    def apply_probe(self, probe: Probe, scores: list[float]) -> None:
        prefill_work.apply_probe(self.policy, self.bs, probe, self.requests[probe.request.request_id], scores)

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
        if need > self.pool.num_free_uncached() - self.watermark:
            return None
        return self.chunks.create(chunk_hash, padded_ids, blocks=self.pool.allocate_uncached(need))

    def finish_adopt(self, e: ChunkEntry) -> None:
        e.ready = True
        self.chunks.release(e)

    # -- growth, preemption and release ------------------------------------------
    def block_table(self, req: Request) -> list[int]:
        return self.requests[req.request_id].block_table

    def shared_runs(self, req: Request) -> list[tuple[tuple[int, ...], int, int]]:
        return self.requests[req.request_id].shared_runs

    def local_spans(self, req: Request) -> list[tuple[int, int, int]]:
        """(first slot, end slot, offset) of the request's keys stored at chunk-local
        positions: MEPIC's shared runs (what it computes is at its own positions), or
        every chunk slot in a private-copy mode, so its copies and recomputes agree."""
        if not self.policy.shares_chunks:
            return req.layout.chunk_spans(self.bs)
        return prefill_work.run_spans(req.layout.positions, self.requests[req.request_id].shared_runs, self.bs)

    def grow(self, req: Request) -> bool:
        """A page for the request's newest slot if it needs one: a free block, else an
        idle chunk's. False when there is none (the scheduler preempts)."""
        kv = self.requests[req.request_id]
        if req.num_slots <= len(kv.block_table) * self.bs:
            return True
        if self.pool.num_free == 0:
            self._evict(1, set())
            if self.pool.num_free == 0:
                return False
        b = self.pool.allocate(1)[0]
        kv.block_table.append(b)
        kv.private_blocks.append(b)
        self.pool.update_peak(self.chunks.idle_blocks)
        return True

    def register_prefix(self, req: Request, num_computed: int) -> None:
        """Publish the request's private blocks whose every slot is computed in context to
        the prefix cache."""
        lay, kv, bs = req.layout, self.requests[req.request_id], self.bs
        for b in kv.computed_blocks:
            if (b + 1) * bs <= num_computed and b < len(lay.block_hashes) and lay.block_hashes[b] is not None:
                self.pool.register(kv.block_table[b], lay.block_hashes[b])

    def preempt(self, req: Request) -> None:
        """Give back everything the request holds. Its answer so far becomes the end of
        its prompt text: on resume it is recomputed, cheaply where the prefix cache
        still holds the blocks published here and its chunks are still resident."""
        kv = self.requests[req.request_id]
        kv.computed_blocks += range(len(req.layout.block_kinds), len(kv.block_table))   # decode pages
        n = len(req.layout.token_ids)
        req.layout = req.layout.extended(req.token_ids[n:], req.positions[n:], self.bs)
        if kv.prefilled:
            self.register_prefix(req, req.num_slots - 1)    # the newest token is not computed yet
        self.free(req)
        req.stats.preemptions += 1

    def finish_compile(self, job: CompileJob) -> bool:
        """The compile's last piece ran. True if the runner should keep a host copy."""
        if job.entry is not None:
            job.entry.ready = True
            del self.compiling[job.chunk_hash]
        if job.scratch_blocks:
            self.pool.free(job.scratch_blocks)
        return job.host_copy and self.copies.add(job.chunk_hash, job.padded_ids)

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
            job = self.compiling.get(e.chunk_hash)
            if job is not None and self.chunks.entries.get(e.chunk_hash) is not e:
                # Its last holder left before the compile ended: the chunk is dropped.
                del self.compiling[e.chunk_hash]
                self.pool.free(job.scratch_blocks)
