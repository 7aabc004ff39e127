"""What a request's prefill computes in context, decided at admission: the slots to
compute (``todo``), or first a selection probe whose scores pick which reused chunk
slots join them (CacheBlend's tokens, MEPIC's blocks). Also the prefill's accounting.
Functions over one request's KV record; the KV cache manager calls them."""
from __future__ import annotations

from mepic_ray.core.kv_state import RequestKV
from mepic_ray.core.policy import ReusePolicy
from mepic_ray.core.request import Request
from mepic_ray.core.work import Probe
from mepic_ray.hashing import PAD_TOKEN


def plan_work(policy: ReusePolicy, bs: int, req: Request, kv: RequestKV, shared_blocks: list[int]) -> None:
    lay = req.layout
    kv.shared_runs = shared_runs(req, kv.block_table, set(shared_blocks), bs)
    n = len(lay.token_ids)
    slots = [s for b in kv.computed_blocks for s in range(b * bs, min((b + 1) * bs, n))
             if lay.token_ids[s] != PAD_TOKEN]
    chunk_slots = [s for c in lay.chunks for s in policy.recompute_slots(c, bs)]
    if policy.selection() is None:
        kv.todo = sorted(slots + chunk_slots)
        account(req, kv, bs)
        return
    kv.todo = sorted(slots)
    if policy.shares_chunks:   # MEPIC: the real slots of its shared blocks
        chunk_slots = [s for b in shared_blocks for s in range(b * bs, (b + 1) * bs) if lay.token_ids[s] != PAD_TOKEN]
    kv.probe = (sorted(chunk_slots), not policy.shares_chunks) if chunk_slots else None
    if kv.probe is None:
        account(req, kv, bs)


def take_probe(policy: ReusePolicy, bs: int, req: Request, kv: RequestKV) -> Probe:
    (candidates, write), kv.probe = kv.probe, None
    return Probe(req, kv.block_table, kv.todo, candidates, write, len(kv.todo) + policy.max_picked(candidates, bs))


def apply_probe(policy: ReusePolicy, bs: int, probe: Probe, kv: RequestKV, scores: list[float]) -> None:
    """The probe's scores decide which candidate slots the prefill recomputes; in MEPIC
    their blocks move to the request's spare private pages. The prefill piece scheduled
    with the probe takes the first of the slots to compute."""
    picked = policy.pick(probe.candidates, scores, bs)
    if policy.shares_chunks:
        blocks = sorted({s // bs for s in picked})
        if len(blocks) > len(kv.spare_blocks):
            raise RuntimeError(f"{len(blocks)} blocks picked but {len(kv.spare_blocks)} spare pages reserved")
        for b in blocks:
            kv.block_table[b] = kv.spare_blocks.pop()
            kv.computed_blocks.append(b)
        kv.shared_runs = shared_runs(probe.request, kv.block_table,
                                     {s // bs for s in probe.candidates} - set(blocks), bs)
    kv.todo = sorted(set(kv.todo).union(picked))
    account(probe.request, kv, bs)
    if probe.seq is not None:
        probe.seq.query_slots = kv.todo[:probe.seq.num_tokens]
        del kv.todo[:probe.seq.num_tokens]
        probe.seq.samples = kv.prefilled = not kv.todo


def shared_runs(req: Request, table: list[int], shared: set[int], bs: int) -> list[tuple[tuple[int, ...], int, int]]:
    """Maximal runs of the ``shared`` logical blocks within each chunk, as RequestKV keeps them."""
    runs = []
    for c in req.layout.chunks:
        pad, j = len(c.padded_ids) - c.num_tokens, 0
        while j < c.num_blocks:
            k = j
            while k < c.num_blocks and c.first_block + k in shared:
                k += 1
            if k > j:
                runs.append((tuple(table[c.first_block + j:c.first_block + k]), (c.first_block + j) * bs, j * bs - pad))
            j = k + 1
    return runs


def run_spans(positions: list[int], runs: list[tuple[tuple[int, ...], int, int]], bs: int) -> list[tuple[int, int, int]]:
    """(first slot, end slot, offset) of each shared run: its slot ``logical + i`` holds
    the chunk-local position ``local + i``."""
    spans = []
    for blocks, logical, local in runs:
        i0 = max(0, -local)      # the run's first real slot (front padding is local < 0)
        spans.append((logical, logical + len(blocks) * bs, positions[logical + i0] - (local + i0)))
    return spans


def account(req: Request, kv: RequestKV, bs: int) -> None:
    """Prefill accounting: chunk slots computed in context are 'recomputed'; a token
    counts as cached only if neither computed nor compiled for this request. The slots
    of an answer (resumed, or preempted and recomputed) are output, not prompt. A
    request resumed after preemption keeps the figures of its first prefill."""
    st = req.stats
    if st.preemptions:
        return
    end = req.num_prompt_slots - req.num_resumed
    computed = [s for s in kv.todo if s < end]
    st.computed_tokens = len(computed)
    st.recomputed_tokens = sum(1 for s in computed if s // bs in req.layout.chunk_of_block)
    st.cached_tokens = st.prompt_tokens - len(kv.compiled_slots.union(computed))
