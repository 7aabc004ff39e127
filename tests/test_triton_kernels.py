"""Triton kernels against the torch reference (under TRITON_INTERPRET=1 on CPU).

Fresh random inputs every run, outputs poisoned (NaN) before the kernel runs and
checked fully written, position maps with gaps and padding (scattered, or the
engine's page-aligned segments), GQA ratios 1/3/8,
head_dim 64 and 128, pages of 16 and 32, fp32/fp16/bf16, plain and Llama-3 RoPE."""
import math
import random

import pytest
import torch

from mepic_ray.kernels import RopeTable, apply_rope, build_paged_seq, paged_attention_ref, write_kv
from mepic_ray.kernels.triton_attention import paged_attention_triton, write_kv_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 runs the dots in IEEE precision; half types round Q, K, P and V to 8 (bf16) or
# 11 (fp16) mantissa bits before each dot and accumulate in fp32. Errors are relative
# to the largest output element; the worst seen over 54 random cases per dtype was
# 6e-7, 7e-4 and 1.1e-2.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}
# GQA ratio -> (kv heads, head_dim): group 3 is SmolLM2's 9/3 heads at head_dim 64,
# group 8 a Llama-3-8B-like head_dim 128.
SHAPES = {1: (2, 128), 3: (3, 64), 8: (1, 128)}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}
VARIANTS = ["table", "in-kernel-rope-split4", "keys-rotated-once", "rope-runs", "packed-gqa"]


def scattered_positions(rng, g, n):
    """Padding anywhere; real slots take increasing positions with occasional jumps
    (a chunk placed after skipped positions), starting anywhere."""
    pad = torch.rand(n, generator=g) < 0.25
    pad[-1] = False
    n_real = int((~pad).sum())
    steps = torch.where(torch.rand(n_real, generator=g) < 0.15, torch.randint(2, 200, (n_real,), generator=g), 1)
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[~pad] = torch.cumsum(steps, 0) - steps[0] + rng.randint(0, 300)
    return pos


def segment_positions(rng, page, n):
    """The engine's layout: runs of prompt text, and chunks that start on a fresh page and
    are front-padded to end on a page boundary; positions continue across segments,
    sometimes after a jump."""
    pos, nxt = [], rng.randint(0, 300)
    while len(pos) < n:
        length = rng.randint(1, 40)
        if rng.random() < 0.6:
            pos += [-1] * ((-len(pos)) % page + (-length) % page)
        if rng.random() < 0.3:
            nxt += rng.randint(1, 200)
        pos += range(nxt, nxt + length)
        nxt += length
    return torch.tensor(pos)     # at least n slots, ending on a real token


def make_case(rng, page, n_seqs, kvh, group, d, dtype, max_slots=70, layout="scattered"):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    seqs = []
    pool_pages = 4
    for _ in range(n_seqs):
        n = rng.randint(1, max_slots)
        pos = scattered_positions(rng, g, n) if layout == "scattered" else segment_positions(rng, page, n)
        n = pos.numel()
        real = torch.nonzero(pos >= 0).flatten()
        decode = rng.random() < 0.5
        ql = real[-1:] if decode else real[torch.randperm(real.numel(), generator=g)[: rng.randint(1, real.numel())]].sort().values
        n_pages = -(-n // page)
        seqs.append((pos, ql, n_pages))
        pool_pages += n_pages
    perm = torch.randperm(pool_pages, generator=g)
    tables, used = [], 0
    for _, _, n_pages in seqs:
        tables.append(perm[used:used + n_pages])
        used += n_pages
    k_cache = torch.randn(pool_pages * page, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(pool_pages * page, kvh, d, generator=g).to(dtype)
    # Padding slots hold NaN: a kernel that reads them fails the test.
    for (pos, _, _), bt in zip(seqs, tables):
        logical = torch.nonzero(pos < 0).flatten()
        slots = bt[logical // page] * page + logical % page
        k_cache[slots] = float("nan")
        v_cache[slots] = float("nan")
    total_q = sum(ql.numel() for _, ql, _ in seqs)
    q = torch.randn(total_q, kvh * group, d, generator=g).to(dtype)
    return seqs, tables, k_cache, v_cache, q


def tile_kinds(seqs, tile):
    """Brute force: how many key tiles below each sequence's last query hold one run of
    positions (pos = c + index in the tile) and how many hold real keys but no run."""
    runs = mixed = 0
    for pos, ql, _ in seqs:
        for start in range(0, int(ql[-1]) + 1 - tile + 1, tile):
            p = pos[start:start + tile]
            shift = {int(x) - j for j, x in enumerate(p) if x >= 0}
            runs += len(shift) == 1
            mixed += len(shift) > 1
    return runs, mixed


def check_against_reference(page, group, dtype, variant, rope_theta=10000.0, rope_scaling=None):
    rng = random.Random()
    kvh, d = SHAPES[group]
    layout, max_slots = ("segments", 120) if variant == "rope-runs" else ("scattered", 70)
    for _ in range(100):
        seqs, tables, k_cache, v_cache, q = make_case(rng, page, 3, kvh, group, d, dtype, max_slots, layout)
        # The keys-rotated-once pass and packed GQA only change a prefill (2+ query rows;
        # packed, 32 rows hold 32 // group tokens: more than that takes several tiles);
        # rope-runs must meet tiles of both kinds.
        if variant in ("keys-rotated-once", "packed-gqa") and not any(ql.numel() > 1 for _, ql, _ in seqs):
            continue
        if variant == "rope-runs" and 0 in tile_kinds(seqs, 16):
            continue
        break
    else:
        raise AssertionError(f"no case for {variant} in 100 draws")
    rope = RopeTable(d, rope_theta, rope_scaling)
    rope.ensure(max(int(pos.max()) for pos, _, _ in seqs) + 1)
    ref_seqs, cu, start = [], [0], 0
    q_pos, q_log = [], []
    for (pos, ql, _), bt in zip(seqs, tables):
        ref_seqs.append(build_paged_seq(start, ql, bt, pos, page, rope))
        start += ql.numel()
        cu.append(start)
        q_pos.append(pos[ql])
        q_log.append(ql)
    q_pos, q_log = torch.cat(q_pos), torch.cat(q_log)
    qc, qs = rope.lookup(q_pos)
    scale = 1 / math.sqrt(d)
    want = paged_attention_ref(apply_rope(q.float(), qc, qs), k_cache.float(), v_cache.float(), ref_seqs, scale)

    max_pages = max(n for _, _, n in seqs)
    bt = torch.zeros(len(seqs), max_pages, dtype=torch.int32)
    kv_pos = torch.full((len(seqs), max_pages * page), -1, dtype=torch.int32)
    for i, ((pos, _, n), t) in enumerate(zip(seqs, tables)):
        bt[i, :n] = t
        kv_pos[i, :pos.numel()] = pos
    cos_half, sin_half = rope.cos[:, : d // 2], rope.sin[:, : d // 2]
    dev = lambda x: x.to(DEVICE)
    # The variant splits decode keys over 4 programs in 16-key tiles (so several
    # pages per split and several splits per page table) and computes RoPE in-kernel.
    extra = {"table": {}, "in-kernel-rope-split4": dict(inv_freq=dev(rope.inv_freq), tile_n=16, decode_tile_n=16,
                                                        num_splits=4),
             "keys-rotated-once": dict(rotate_keys_once=True, tile_n=16, prefill_warps=8, prefill_stages=2),
             "rope-runs": dict(rope_runs=True, tile_n=16, decode_tile_n=16, num_splits=2),
             "packed-gqa": dict(pack_gqa=True, block_m=32, tile_n=16),
             "fp16-tables": {}}[variant]
    if variant == "fp16-tables":
        cos_half, sin_half = cos_half.half(), sin_half.half()
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    got = paged_attention_triton(dev(q), dev(q_pos), dev(q_log), cu, dev(k_cache), dev(v_cache), dev(bt),
                                 dev(kv_pos), page, dev(cos_half), dev(sin_half), scale, out=out, **extra)
    assert got.data_ptr() == out.data_ptr()
    got = got.cpu()
    assert torch.isfinite(got).all(), "output not fully written or padding leaked"
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return err


@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_paged_rope_attention_matches_reference(page, group, dtype, variant):
    check_against_reference(page, group, dtype, variant)


@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp16_rope_tables_match_reference(page, group, dtype):
    # fp16 cos/sin halve the table's bytes; their rounding (about 5e-4) is below what
    # half-precision K/V carry anyway, so they are offered for those only.
    check_against_reference(page, group, dtype, "fp16-tables")


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama3_scaled_rope_matches_reference(variant):
    # Positions run past original_max_position_embeddings, where the scaled and
    # plain frequencies differ; the in-kernel variant must use the scaled inv_freq.
    check_against_reference(16, 3, torch.float32, variant, rope_theta=500000.0, rope_scaling=LLAMA3)


def test_out_of_the_wrong_shape_is_refused():
    q = torch.randn(2, 3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="out must be"):
        paged_attention_triton(q, torch.zeros(2), torch.tensor([0, 1]), [0, 2], torch.zeros(16, 1, 64, device=DEVICE),
                               torch.zeros(16, 1, 64, device=DEVICE), torch.zeros(1, 1, dtype=torch.int32),
                               torch.zeros(1, 16, dtype=torch.int32), 16, torch.ones(4, 32), torch.zeros(4, 32),
                               0.125, out=torch.empty(2, 3, 32, device=DEVICE))


@pytest.mark.parametrize("kvh,d", [(2, 32), (3, 64), (8, 128)])   # rows of 64, 192 (not a power of two), 1024
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_write_kv_matches_reference(kvh, d, dtype):
    g = torch.Generator().manual_seed(random.randrange(2**31))
    # fp32 K/V into the cache's dtype, as the model hands them over.
    k, v = torch.randn(20, kvh, d, generator=g), torch.randn(20, kvh, d, generator=g)
    slots = torch.randperm(64, generator=g)[:20]
    slots[::4] = -1
    want_k, want_v = torch.full((64, kvh, d), 7.0, dtype=dtype), torch.full((64, kvh, d), 7.0, dtype=dtype)
    write_kv(want_k, want_v, k, v, slots)
    got_k = torch.full((64, kvh, d), 7.0, dtype=dtype, device=DEVICE)
    got_v = torch.full((64, kvh, d), 7.0, dtype=dtype, device=DEVICE)
    write_kv_triton(got_k, got_v, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)
