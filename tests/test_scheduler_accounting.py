"""The scheduler and KV cache manager without a model (as SGLang's cache can be built
for simulators): random admission, growth, preemption, abort and finish sequences,
with every page's reference count checked against a brute-force count of who holds
it after every step."""
import math
import random
from collections import Counter

from hypothesis import HealthCheck, given, settings, strategies as st

from mepic_ray.core.block_pool import OutOfBlocksError
from mepic_ray.core.kv_manager import KVCacheManager
from mepic_ray.core.layout import build_layout
from mepic_ray.core.policy import make_policy
from mepic_ray.core.request import Request, Status
from mepic_ray.core.scheduler import Scheduler
from mepic_ray.sampling_params import SamplingParams
from mepic_ray.segments import Segment

MODES = [("full", {}), ("prefix", {}), ("naive", {}), ("epic", {"recompute_tokens": 3}),
         ("cacheblend", {"ratio": 0.3}), ("mepic", {}), ("mepic", {"block_ratio": 0.5}),
         ("mepic", {"recompute_tokens": 5})]
BS = 4
PROBE_DEPTH = 0.25


def expected_refs(kv: KVCacheManager) -> Counter:
    refs = Counter()
    for r in kv.requests.values():
        refs.update(r.private_blocks)
        for e in r.held_chunks:
            refs.update(e.blocks)
    for job in kv.compiling.values():
        refs.update(job.scratch_blocks)
    return refs


def check_accounting(kv: KVCacheManager, sched: Scheduler) -> None:
    pool, chunks = kv.pool, kv.chunks
    refs = expected_refs(kv)
    assert [pool.ref_cnt[b] for b in range(pool.num_blocks)] == [refs[b] for b in range(pool.num_blocks)]
    owned = Counter(b for e in chunks.entries.values() for b in e.blocks)
    assert all(n == 1 for n in owned.values()), "a page owned by two chunks"
    assert {b for b in range(pool.num_blocks) if pool.chunk_owned[b]} == set(owned)
    assert set(pool.free_queue) == {b for b in range(pool.num_blocks) if refs[b] == 0 and b not in owned}
    holders = Counter(e.chunk_hash for r in kv.requests.values() for e in r.held_chunks)
    assert {h: e.ref for h, e in chunks.entries.items()} == {h: holders[h] for h in chunks.entries}
    assert set(chunks.idle) == {h for h, e in chunks.entries.items() if e.ref == 0}
    assert chunks.idle_blocks == sum(len(chunks.entries[h].blocks) for h in chunks.idle)
    assert all(e.ready for e in chunks.idle.values()), "an unfinished compile kept after its last holder"
    assert set(kv.compiling) <= set(chunks.entries)
    # Every page a request will still write (its slots to compute, its newest slot) is its alone.
    for req in sched.running:
        r = kv.requests[req.request_id]
        newest = [req.num_slots - 1] if r.prefilled and req.num_slots <= len(r.block_table) * BS else []
        for s in list(r.todo) + newest:     # (a newest slot past the table takes a fresh page)
            b = r.block_table[s // BS]
            assert pool.ref_cnt[b] == 1 and not pool.chunk_owned[b], f"slot {s} written into a shared page"
    for req in sched.waiting:
        assert req.request_id not in kv.requests, "a waiting (or preempted) request holds pages"
    assert set(kv.requests) == {r.request_id for r in sched.running}


def new_request(kv, rid, rng, docs, chunked) -> Request | None:
    chosen = rng.sample(docs, rng.randint(0, min(3, len(docs))))
    segs = [Segment(False, [rng.randint(1, 90) for _ in range(rng.randint(1, 6))])]
    segs += [Segment(True, list(d)) for d in chosen]
    segs.append(Segment(False, [rng.randint(1, 90) for _ in range(rng.randint(1, 6))]))
    layout = build_layout(segs, BS, chunked, "fp")
    room = kv.room_after(layout)
    if room < 1:
        return None
    params = SamplingParams(max_tokens=min(rng.randint(1, 48), room), temperature=0, ignore_eos=True)
    req = Request(rid, None, params, segs, layout)
    kv.check_fits(req)
    return req


def run_step(kv, sched, rng, finished) -> int:
    """One step with the model replaced by random tokens and scores. Returns the rows computed."""
    decoding = [r for r in sched.running if kv.requests[r.request_id].prefilled]
    out = sched.schedule()
    for req in decoding:   # a running decode is in every step, unless it was preempted
        assert req in out.preempted or any(s.request is req for s in out.decodes)
    for probe in out.probes:
        kv.apply_probe(probe, [rng.random() for _ in probe.candidates])
    rows = sum(len(p.query_slots) for p in out.compiles) + sum(len(s.query_slots) for s in out.prefills)
    rows += len(out.decodes)
    probe_cost = sum(math.ceil(PROBE_DEPTH * (len(p.query_slots) + len(p.candidates))) for p in out.probes)
    # A probe is never split: it may overrun the budget only as the step's last work.
    assert rows <= sched.max_num_batched_tokens
    if rows + probe_cost > sched.max_num_batched_tokens:
        assert out.probes[-1].seq is None, (rows, probe_cost)
    for piece in out.compiles:
        if piece.last:
            kv.finish_compile(piece.job)
    for seq in out.prefills + out.decodes:
        if seq.samples:
            req = seq.request
            req.append_token(rng.randint(1, 90))
            if len(req.output_ids) >= req.params.max_tokens:
                sched.finish(req)
                finished.add(req.request_id)
    return rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(range(len(MODES))), seed=st.integers(0, 2**32 - 1),
       num_blocks=st.integers(10, 32), budget=st.integers(6, 40), max_seqs=st.integers(1, 6),
       ops=st.lists(st.sampled_from(["add", "add", "step", "step", "step", "abort"]), min_size=5, max_size=60))
def test_page_accounting_under_preemption_matches_brute_force(mode, seed, num_blocks, budget, max_seqs, ops):
    name, options = MODES[mode]
    policy = make_policy(name, options)
    kv = KVCacheManager(policy, BS, num_blocks, bytes_per_block=1 << 20)
    sched = Scheduler(kv, max_seqs, max(budget, max_seqs), PROBE_DEPTH if policy.selection() else 0.0)
    rng = random.Random(seed)
    docs = [tuple(rng.randint(1, 90) for _ in range(rng.randint(1, 14))) for _ in range(4)]
    added, finished = {}, set()
    try:
        for i, op in enumerate(ops):
            if op == "add":
                for j in range(rng.randint(1, 3)):
                    req = new_request(kv, f"r{i}.{j}", rng, docs, policy.chunked)
                    if req is not None:
                        added[req.request_id] = req
                        sched.add(req)
            elif op == "abort" and added:
                rid = rng.choice(sorted(added))
                if sched.abort(rid) is not None:
                    finished.add(rid)
            else:
                run_step(kv, sched, rng, finished)
            check_accounting(kv, sched)
        for _ in range(3000):        # everything accepted finishes
            if not sched.num_unfinished:
                break
            run_step(kv, sched, rng, finished)
            check_accounting(kv, sched)
    except OutOfBlocksError as e:
        raise AssertionError(f"over-commit: {e}") from e
    assert sched.num_unfinished == 0 and finished == set(added)
    assert all(r.status is Status.FINISHED for r in added.values())
    kv.reset_cache()
    assert kv.pool.num_free == num_blocks and not kv.requests and not kv.compiling


def test_preemption_happens_and_a_request_aborted_while_preempted_frees_everything():
    policy = make_policy("mepic", {})
    kv = KVCacheManager(policy, BS, 14, bytes_per_block=1 << 20)
    sched = Scheduler(kv, 4, 64)
    rng = random.Random(0)
    doc = tuple(range(1, 13))
    reqs = []
    for i in range(3):
        segs = [Segment(False, [50 + i]), Segment(True, list(doc)), Segment(False, [60 + i, 61])]
        req = Request(f"r{i}", None, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), segs,
                      build_layout(segs, BS, True, "fp"))
        kv.check_fits(req)
        reqs.append(req)
        sched.add(req)
    finished: set[str] = set()
    for _ in range(40):
        run_step(kv, sched, rng, finished)
        check_accounting(kv, sched)
        preempted = [r for r in sched.waiting if r.stats.preemptions]
        if preempted:
            break
    assert preempted, "a 14-page pool with three growing requests must preempt"
    victim = preempted[0]
    assert victim.output_ids, "the victim had generated tokens, kept for its resume"
    assert sched.abort(victim.request_id) is victim
    check_accounting(kv, sched)
    while sched.num_unfinished:
        run_step(kv, sched, rng, finished)
        check_accounting(kv, sched)
    kv.reset_cache()
    assert kv.pool.num_free == 14
