"""Cascade attention over shared chunk pages against the per-sequence reference
(``mepic_ray.kernels.paged_attention_ref``, which turns every key by its offset): random layouts
of chunks of several blocks shared by several sequences at different offsets in one
step, private and chunk pages mixed, decodes and prefill pieces together (their rows
contiguous, with or without keys before them, or scattered over recomputed blocks), and
every padding or unused slot poisoned with NaN, which must never be read."""
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from mepic_ray.kernels import RopeTable, apply_rope, build_paged_seq, paged_attention_ref
from mepic_ray.kernels.cascade import cascade_attention
from mepic_ray.worker import cascade_plan
from mepic_ray.worker.cascade_plan import build_cascade, slot_offsets
from mepic_ray.worker.model_runner import SeqSpec

BS, HEADS, KV_HEADS, DIM = 4, 4, 2, 16


def poisoned_pool(rng: random.Random, num_blocks: int = 200):
    """Free blocks in random order and K/V caches whose every slot holds NaN until filled."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    k_cache = torch.full((num_blocks * BS, KV_HEADS, DIM), float("nan"))
    return free, k_cache, torch.full_like(k_cache, float("nan"))


def random_step(rng: random.Random, num_seqs: int):
    """A pool, chunks laid out once on shared pages, and sequences reading them."""
    free, k_cache, v_cache = poisoned_pool(rng)

    def fill(block: int, slot_in_block: int) -> None:
        slot = block * BS + slot_in_block
        k_cache[slot] = torch.randn(KV_HEADS, DIM)
        v_cache[slot] = torch.randn(KV_HEADS, DIM)

    chunks = []
    for _ in range(3):
        n = rng.randint(2, 13)
        pad = (-n) % BS
        blocks = [free.pop() for _ in range((n + pad) // BS)]
        for i in range(pad, n + pad):
            fill(blocks[i // BS], i % BS)
        chunks.append((blocks, pad, n))
    specs = []
    for _ in range(num_seqs):
        table, positions, runs, spans, pos, recompute = [], [], [], [], 0, []
        for part in range(rng.randint(0, 4)):     # none: a prefill with nothing before it
            if part and rng.random() < 0.7:       # a chunk, its first block private or shared
                blocks, pad, n = rng.choice(chunks)
                private_first = rng.random() < 0.5 and len(blocks) > 1
                first = len(table)
                for j, b in enumerate(blocks):
                    if j == 0 and private_first:
                        b = free.pop()
                        for i in range(pad, BS):
                            fill(b, i)
                    table.append(b)
                start = 1 if private_first else 0
                if private_first and rng.random() < 0.5:   # recomputed in this step (MEPIC)
                    recompute += [first * BS + i for i in range(pad, BS)]
                runs.append((tuple(blocks[start:]), (first + start) * BS, start * BS - pad))
                # Keys at chunk-local positions: the whole chunk (private-copy modes), or
                # only its shared pages (MEPIC: what it recomputes is at its own positions).
                lo = first if rng.random() < 0.5 else first + start
                spans.append((lo * BS, (first + len(blocks)) * BS, pos))
                positions += [-1] * pad + list(range(pos, pos + n))
                pos += n
            else:                                  # private text, end-padded
                n = rng.randint(1, 9)
                nb = -(-n // BS)
                for _ in range(nb):
                    table.append(free.pop())
                positions += list(range(pos, pos + n)) + [-1] * (nb * BS - n)
                for j in range(n):
                    fill(table[-nb + j // BS], j % BS)
                pos += n
        # The sequence ends with its own text: a decode's slot, or a prefill piece's.
        n_tail = rng.choice([1, 1, rng.randint(2, 7)])
        tail_start = len(positions)
        for j in range(n_tail):
            if len(positions) % BS == 0:
                table.append(free.pop())
            positions.append(pos + j)
            fill(table[-1], (len(positions) - 1) % BS)
        query = recompute + list(range(tail_start, len(positions)))
        specs.append(SeqSpec([0] * len(positions), positions, table, query, runs, spans))
    return k_cache, v_cache, specs


@pytest.mark.parametrize("tile_rows", [2, 32])
@pytest.mark.parametrize("kernel", ["flash", "math", "auto"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), num_seqs=st.integers(1, 6))
def test_cascade_matches_the_per_sequence_reference(kernel, tile_rows, seed, num_seqs, monkeypatch):
    monkeypatch.setattr(cascade_plan, "TILE_ROWS", tile_rows)
    check_against_reference(kernel, seed, num_seqs)


def mepic_step(rng: random.Random, num_seqs: int):
    """MEPIC prefills: text, then chunks whose first block is private and recomputed in
    this step and whose other pages are shared, then the question; every row in one piece."""
    free, k_cache, v_cache = poisoned_pool(rng)

    def fill(block: int, lo: int, hi: int) -> None:
        k_cache[block * BS + lo:block * BS + hi] = torch.randn(hi - lo, KV_HEADS, DIM)
        v_cache[block * BS + lo:block * BS + hi] = torch.randn(hi - lo, KV_HEADS, DIM)

    chunks = []
    for _ in range(3):
        n = rng.randint(5, 13)
        pad = (-n) % BS
        blocks = [free.pop() for _ in range((n + pad) // BS)]
        for b in blocks[1:]:
            fill(b, 0, BS)
        chunks.append((blocks, pad, n))
    specs = []
    for _ in range(num_seqs):
        table, positions, runs, spans, query = [free.pop()], list(range(3)) + [-1], [], [], [0, 1, 2]
        fill(table[0], 0, 3)
        pos = 3
        for blocks, pad, n in rng.sample(chunks, rng.randint(1, 3)):
            first = len(table)
            table += [free.pop()] + blocks[1:]
            fill(table[first], pad, BS)
            query += [first * BS + i for i in range(pad, BS)]
            runs.append((tuple(blocks[1:]), (first + 1) * BS, BS - pad))
            spans.append(((first + 1) * BS, len(table) * BS, pos))
            positions += [-1] * pad + list(range(pos, pos + n))
            pos += n
        table.append(free.pop())
        n_tail = rng.randint(2, BS)
        fill(table[-1], 0, n_tail)
        query += list(range(len(positions), len(positions) + n_tail))
        positions += list(range(pos, pos + n_tail))
        specs.append(SeqSpec([0] * len(positions), positions, table, query, runs, spans))
    return k_cache, v_cache, specs


@pytest.mark.parametrize("kernel", ["flash", "math"])
def test_a_prefill_between_chunks_masks_only_within_its_tiles(kernel, monkeypatch):
    """MEPIC prefills (recomputed first blocks between chunk pages): in tiles of rows,
    each reading the keys before it unmasked, the step computes fewer row-key products
    than one masked product over every row and key, and still matches the reference."""
    monkeypatch.setattr(cascade_plan, "TILE_ROWS", 4)
    for seed in range(8):
        _, (own, *_) = check_against_reference(kernel, seed, 1 + seed % 4, layout=mepic_step)
        for keys in own:
            rows = {(t.q_start, t.q_end) for t in keys.tiles}
            computed = sum((t.q_end - t.q_start) * (t.k_end - t.k_start) for t in keys.tiles)
            n = max(t.q_end for t in keys.tiles) - min(t.q_start for t in keys.tiles)
            assert len(rows) > 1 and computed < n * keys.kv_slots.numel()


@pytest.mark.parametrize("kernel", ["flash", "auto"])
def test_queries_in_any_memory_layout(kernel):
    """Queries laid out as a transposed projection's output (last dimension not
    contiguous) attend the same: torch's CPU flash kernel misreads such a tensor
    silently, so the backend must hand it contiguous rows."""
    for seed in range(12):
        check_against_reference(kernel, seed, 1 + seed % 4, transposed_queries=True)


def test_rows_around_computed_text_read_it_under_a_mask():
    """Rows before and after private text computed earlier, at offset 0 like the rows:
    not a causal product over the rows alone, which would skip that text."""
    def text_between(rng, num_seqs):
        k_cache = torch.randn(8 * BS, KV_HEADS, DIM)
        v_cache = torch.randn_like(k_cache)
        n = 3 * BS
        return k_cache, v_cache, [SeqSpec([0] * n, list(range(n)), [5, 2, 7], [0, 1, 2, 3, 8, 9, 10, 11])]

    _, (own, *_) = check_against_reference("flash", 0, 1, layout=text_between)
    assert all(not t.causal for t in own[0].tiles)


def test_rows_out_of_order_are_refused():
    """The scheduler hands every piece its rows in slot order; rows in another order
    would read the wrong keys through the tiles, so the plan refuses them."""
    rng = random.Random(0)
    _, _, specs = mepic_step(rng, 1)
    s = specs[0]
    s.query_slots = s.query_slots[1:] + s.query_slots[:1]
    rope = RopeTable(DIM, 10000.0)
    rows_pos = torch.tensor([s.positions[j] for j in s.query_slots])
    offsets = [slot_offsets(s.positions, s.local_spans, max(s.query_slots) + 1)]
    with pytest.raises(ValueError, match="ascending"):
        build_cascade(specs, offsets, rows_pos, [torch.tensor(s.query_slots)], BS, rope, "cpu")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=40))
def test_buckets_hold_every_run_once_within_their_slack(shapes):
    rows, keys = zip(*shapes)
    groups = cascade_plan._buckets(list(rows), list(keys))
    assert sorted(i for g in groups for i in g) == list(range(len(shapes)))
    for g in groups:
        padded = len(g) * max(rows[i] for i in g) * max(keys[i] for i in g)
        assert padded <= 1.25 * sum(rows[i] * keys[i] for i in g) + 1e-9


def check_against_reference(kernel: str, seed: int, num_seqs: int, transposed_queries: bool = False,
                            layout=random_step) -> tuple:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    k_cache, v_cache, specs = layout(rng, num_seqs)
    rope = RopeTable(DIM, 10000.0)
    rows_logical = [torch.tensor(s.query_slots) for s in specs]
    rows_pos = torch.tensor([s.positions[j] for s in specs for j in s.query_slots])
    q = torch.randn(rows_pos.numel(), HEADS, DIM)
    if transposed_queries:          # the same values, each row's elements rows apart
        q = q.reshape(q.shape[0], -1).t().contiguous().t().view(q.shape)
    q_cos, q_sin = rope.lookup(rows_pos)
    scale = 1 / math.sqrt(DIM)

    offsets = [slot_offsets(s.positions, s.local_spans, s.query_slots[-1] + 1) for s in specs]
    plan = build_cascade(specs, offsets, rows_pos, rows_logical, BS, rope, "cpu")
    got = cascade_attention(q, q_cos, q_sin, k_cache, v_cache, *plan, scale, kernel=kernel)

    ref_seqs, start = [], 0
    for s, off, ql in zip(specs, offsets, rows_logical):
        ref_seqs.append(build_paged_seq(start, ql, torch.tensor(s.block_table), off, BS, rope))
        start += ql.numel()
    want = paged_attention_ref(apply_rope(q, q_cos, q_sin), k_cache, v_cache, ref_seqs, scale)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A run several sequences read wholly before their query rows takes the shared path.
    keys = [k for s in specs for k in {(b, loc) for b, logical, loc in s.shared_runs
                                       if logical + len(b) * BS <= s.query_slots[0]}]
    if len(keys) > len(set(keys)):
        assert plan[3], "a run read by several sequences must take the shared path"
    return specs, plan


def test_a_chunk_read_by_several_sequences_is_one_run():
    """Two sequences reading the same chunk pages at different offsets: one shared run
    with both sequences' rows, not one per sequence."""
    rng = random.Random(3)
    for _ in range(50):
        k_cache, v_cache, specs = random_step(rng, 4)
        # Runs read the shared way, once per sequence (a chunk twice in one is two groups).
        keys = [k for s in specs for k in {(b, loc) for b, logical, loc in s.shared_runs
                                           if logical + len(b) * BS <= s.query_slots[0]}]
        if len(keys) > len(set(keys)):
            break
    rope = RopeTable(DIM, 10000.0)
    rows_pos = torch.tensor([s.positions[j] for s in specs for j in s.query_slots])
    offsets = [slot_offsets(s.positions, s.local_spans, s.query_slots[-1] + 1) for s in specs]
    *_, shared = build_cascade(specs, offsets, rows_pos, [torch.tensor(s.query_slots) for s in specs], BS, rope,
                               "cpu")
    assert shared and sum(run.rows.shape[0] for run in shared) < len(keys)
    rows_per_run = [run.rows.shape[1] if run.real_rows is None else int(run.real_rows.sum(1).max())
                    for run in shared]
    assert max(rows_per_run) >= 2
