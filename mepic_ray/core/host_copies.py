"""Which chunks the EPIC / CacheBlend baselines keep a host copy of (LMCache's role in
the paper): chunk KV off the pool, copied into each request's private blocks. This
is the directory; the runner holds the tensors and drops the ones evicted here."""
from __future__ import annotations

from collections import OrderedDict

from mepic_ray.core.chunk_coordinator import ChunkHashCollisionError
from mepic_ray.core.work import CompileJob, CopyIn, SchedulerOutput


class HostCopies:
    def __init__(self, budget_bytes: int, bytes_per_block: int, block_size: int):
        self.budget_bytes, self.bytes_per_block, self.bs = budget_bytes, bytes_per_block, block_size
        self.entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()   # hash -> padded tokens, LRU first
        self.bytes_used = 0
        self.dropped: list[str] = []     # evicted since the runner last dropped tensors

    def _nbytes(self, token_ids: tuple[int, ...]) -> int:
        return len(token_ids) // self.bs * self.bytes_per_block

    def lookup(self, chunk_hash: str, token_ids: tuple[int, ...]) -> bool:
        held = self.entries.get(chunk_hash)
        if held is None:
            return False
        if held != token_ids:
            raise ChunkHashCollisionError(f"chunk hash {chunk_hash} maps to two different token sequences")
        self.entries.move_to_end(chunk_hash)
        return True

    def add(self, chunk_hash: str, token_ids: tuple[int, ...]) -> bool:
        """Record a copy the runner is about to take; False (and no copy) if it can never
        fit or is already held (another request compiled the same chunk meanwhile)."""
        nbytes = self._nbytes(token_ids)
        if nbytes > self.budget_bytes or chunk_hash in self.entries:
            return False
        while self.bytes_used + nbytes > self.budget_bytes:
            old, old_ids = self.entries.popitem(last=False)
            self.bytes_used -= self._nbytes(old_ids)
            self.dropped.append(old)
        self.entries[chunk_hash] = token_ids
        self.bytes_used += nbytes
        return True

    def take_dropped(self) -> list[str]:
        # A hash evicted and added again within one step keeps its (new) copy.
        out = [h for h in dict.fromkeys(self.dropped) if h not in self.entries]
        self.dropped = []
        return out

    def clear(self) -> None:
        self.dropped += list(self.entries)
        self.entries.clear()
        self.bytes_used = 0

    def fill(self, req, table: list[int], host_copied: set[str], out: SchedulerOutput,
             count: bool = True) -> tuple[list[CompileJob], set[int]]:
        """A request's private copy of each of its chunks' KV: copied in from a host copy,
        or compiled straight into its blocks (the compile offers a host copy when it
        ends, if the budget allows). Returns the compiles and the slots compiled."""
        jobs: list[CompileJob] = []
        compiled: set[int] = set()
        for c in req.layout.chunks:
            blocks = table[c.first_block:c.first_block + c.num_blocks]
            if c.chunk_hash in host_copied:
                out.copies.append(CopyIn(c.chunk_hash, blocks))
                continue
            jobs.append(CompileJob(c.chunk_hash, c.padded_ids, blocks,
                                   host_copy=self._nbytes(c.padded_ids) <= self.budget_bytes))
            compiled.update(c.real_slots(self.bs))
            if count:
                req.stats.compiled_tokens += c.num_tokens
        return jobs, compiled
