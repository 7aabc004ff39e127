"""Fused-RoPE paged attention on a GPU: correctness at real sizes and timings.

    python -m bench.kernels_gpu --out DIR              # every variant at every size
    python -m bench.kernels_gpu --sweep decode --out DIR     # launch configurations
    python -m bench.kernels_gpu --sweep prefill --out DIR
    python -m bench.kernels_gpu --smoke [--sweep ...] --out DIR    # tiny, on CPU (TRITON_INTERPRET=1)

For each shape (SmolLM2: 9 q / 3 kv heads, head_dim 64; Llama-3-8B-like: 32 / 8,
head_dim 128) and context it checks every variant of the Triton kernel against
torch (rotate gathered K, then scaled_dot_product_attention on contiguous K/V),
then times them, the same kernel without RoPE, and torch. Bandwidth is compared
with a measured device-to-device copy. Positions are 0..ctx-1, so every key tile
is one run of positions (what chunk and prompt pages are in the engine).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mepic_ray.kernels import RopeTable, apply_rope
from mepic_ray.kernels.triton_attention import paged_attention_triton

# name -> (modes it applies to, options of paged_attention_triton; "tables16": fp16 cos/sin)
VARIANTS = {
    "table": (("decode", "prefill"), {}),
    "trig": (("decode", "prefill"), {"in_kernel": True}),
    "table16": (("decode", "prefill"), {"tables16": True}),
    "runs": (("decode", "prefill"), {"rope_runs": True}),
    "runs16": (("decode", "prefill"), {"rope_runs": True, "tables16": True}),
    "once": (("prefill",), {"rotate_keys_once": True}),
    "packed": (("prefill",), {"pack_gqa": True}),
    "packed_runs": (("prefill",), {"pack_gqa": True, "rope_runs": True}),
}
# The RoPE settings the sweeps cross with launch configurations.
SWEEP_ROPE = {"nope": {"use_rope": False}, "table": {}, "runs": {"rope_runs": True},
              "once": {"rotate_keys_once": True}, "packed_nope": {"pack_gqa": True, "use_rope": False},
              "packed": {"pack_gqa": True}}


def layout(options):
    """Packing GQA changes the kernel whether or not it rotates: a variant's RoPE cost is
    taken against the no-RoPE kernel of its own layout."""
    return "packed" if options.get("pack_gqa") else "plain"


def timeit(fn, iters=20, repeats=3):
    """Best of ``repeats`` means over ``iters`` calls (run-to-run noise was about 10%)."""
    if not torch.cuda.is_available():       # --smoke: wall time of one call
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / iters / 1e3)
    return best


def copy_bandwidth(device):
    x = torch.empty(1 << (30 if device == "cuda" else 20), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / timeit(lambda: y.copy_(x))


class Case:
    """One shape, context and mode: a shuffled page pool, every slot real."""

    def __init__(self, h, kvh, d, ctx, batch, page, mode, dtype, rope, device="cuda"):
        self.h, self.kvh, self.d, self.ctx, self.batch, self.page, self.mode = h, kvh, d, ctx, batch, page, mode
        self.dtype, self.rope = dtype, rope
        n_pages = ctx // page
        self.pool = torch.randn(batch * n_pages * page, kvh, d, device=device, dtype=dtype)
        self.vpool = torch.randn_like(self.pool)
        self.tables = torch.randperm(batch * n_pages, device=device).view(batch, n_pages).int()
        self.kv_pos = torch.arange(ctx, device=device).repeat(batch, 1).int()
        self.nq = 1 if mode == "decode" else ctx
        self.q_logical = (torch.full((batch,), ctx - 1, device=device) if mode == "decode"
                          else torch.arange(ctx, device=device).repeat(batch))
        self.q = torch.randn(batch * self.nq, h, d, device=device, dtype=dtype)
        self.cu = [i * self.nq for i in range(batch + 1)]
        self.cos_h, self.sin_h = rope.cos[:, : d // 2].contiguous(), rope.sin[:, : d // 2].contiguous()
        # Converted once here: a conversion inside the timed call would be timed too.
        self.cos_h16, self.sin_h16 = self.cos_h.half(), self.sin_h.half()

    def triton(self, use_rope=True, in_kernel=False, tables16=False, **options):
        cos_h, sin_h = (self.cos_h16, self.sin_h16) if tables16 else (self.cos_h, self.sin_h)
        return paged_attention_triton(self.q, self.q_logical, self.q_logical, self.cu, self.pool, self.vpool,
                                      self.tables, self.kv_pos, self.page, cos_h, sin_h, 1 / math.sqrt(self.d),
                                      use_rope=use_rope, inv_freq=self.rope.inv_freq if in_kernel else None,
                                      **options)

    def torch_ref(self):
        # Gather every sequence's pages into contiguous K/V, rotate K, then SDPA (batched).
        b, ctx, kvh, d = self.batch, self.ctx, self.kvh, self.d
        cos, sin = self.rope.cos[:ctx].to(self.dtype), self.rope.sin[:ctx].to(self.dtype)
        slots = (self.tables.long()[:, :, None] * self.page + torch.arange(self.page, device=self.q.device)).flatten(1)
        k = apply_rope(self.pool[slots].flatten(0, 1), cos.repeat(b, 1), sin.repeat(b, 1))
        k = k.view(b, ctx, kvh, d).transpose(1, 2)
        v = self.vpool[slots].transpose(1, 2)
        qr = apply_rope(self.q, cos[self.q_logical], sin[self.q_logical]).view(b, self.nq, self.h, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qr, k, v, is_causal=self.mode == "prefill", enable_gqa=True)
        return o.transpose(1, 2).reshape(b * self.nq, self.h, d)

    def rel_err(self, got, want):
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    def kv_bytes(self):
        return 2 * self.batch * self.ctx * self.kvh * self.d * self.pool.element_size()

    def flops(self):
        return 4 * self.batch * self.nq * self.ctx * self.h * self.d * (0.5 if self.mode == "prefill" else 1.0)


def run_case(case: Case) -> dict:
    want = case.torch_ref().float()
    row = dict(mode=case.mode, h=case.h, kvh=case.kvh, d=case.d, ctx=case.ctx, batch=case.batch, page=case.page,
               dtype=str(case.dtype), t_nope_s={}, t_torch_s=timeit(case.torch_ref), rel_err={}, t_s={})
    for name, (modes, options) in VARIANTS.items():
        if case.mode in modes:
            if layout(options) not in row["t_nope_s"]:
                row["t_nope_s"][layout(options)] = timeit(
                    lambda: case.triton(use_rope=False, pack_gqa=options.get("pack_gqa", False)))
            row["rel_err"][name] = case.rel_err(case.triton(**options), want)
            row["t_s"][name] = timeit(lambda: case.triton(**options))
    best = min(row["t_s"].values())
    row.update(best=min(row["t_s"], key=row["t_s"].get), gbps=case.kv_bytes() / best / 1e9,
               tflops=case.flops() / best / 1e12)
    return row


def sweep_decode(copy_bw, device, smoke):
    """Tiles, splits and warps, with and without RoPE (table and runs), at 32k, batch 16,
    for both shapes: the SmolLM2 shape moves little per program and may want other tiles."""
    rows = []
    for (h, kvh, d) in [(9, 3, 64), (32, 8, 128)]:
        rope = RopeTable(d, 500000.0, device=device)
        rope.ensure(32768)
        case = Case(h, kvh, d, 64 if smoke else 32768, 2 if smoke else 16, 16, "decode", torch.bfloat16, rope,
                    device)
        grid = list(itertools.product((16,) if smoke else (32, 64, 128), (2,) if smoke else (2, 4, 8, 16),
                                      (4,) if smoke else (4, 8), ("nope", "table", "runs")))
        for tile, splits, warps, rope_mode in tqdm(grid, desc=f"decode sweep {h}/{kvh}/{d}"):
            t = timeit(lambda: case.triton(decode_tile_n=tile, num_splits=splits, decode_warps=warps,
                                           **SWEEP_ROPE[rope_mode]))
            rows.append(dict(shape=f"{h}/{kvh}/{d}", tile=tile, splits=splits, warps=warps, rope=rope_mode, t_s=t,
                             pct_copy=case.kv_bytes() / t / copy_bw * 100))
    return rows, ("shape", "rope"), "pct_copy"


def sweep_prefill(copy_bw, device, smoke):
    """BLOCK_M, TILE_N, warps and stages for no RoPE, table, runs, once and packed GQA
    (with and without RoPE), Llama shape at 16k."""
    rows = []
    rope = RopeTable(128, 500000.0, device=device)
    rope.ensure(16384)
    case = Case(32, 8, 128, 32 if smoke else 16384, 1, 32, "prefill", torch.bfloat16, rope, device)
    grid = list(itertools.product((16,) if smoke else (64, 128), (16,) if smoke else (32, 64, 128),
                                  (4,) if smoke else (4, 8), (2,) if smoke else (2, 3),
                                  ("nope", "table", "runs", "once", "packed_nope", "packed")))
    for bm, tile, warps, stages, variant in tqdm(grid, desc="prefill sweep"):
        options = SWEEP_ROPE[variant]
        row = dict(block_m=bm, tile=tile, warps=warps, stages=stages, rope=variant)
        try:
            t = timeit(lambda: case.triton(block_m=bm, tile_n=tile, prefill_warps=warps, prefill_stages=stages,
                                           **options), iters=5)
        except Exception as e:      # a configuration that does not fit in shared memory
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        rows.append({**row, "t_s": t, "tflops": case.flops() / t / 1e12})
    return rows, ("rope",), "tflops"


def write_sweep(out, which, meta, rows, group_by, score):
    """JSON of every configuration, and a table of the best three per group."""
    with open(os.path.join(out, f"kernels_gpu_sweep_{which}.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    ok = [r for r in rows if "t_s" in r]
    keys = [k for k in ok[0] if k not in ("t_s", score)]
    lines = [f"Device: {meta['device']}; copy {meta['copy_gbps']:.0f} GB/s; {which} sweep, best three per "
             f"{' and '.join(group_by)} ({len(rows) - len(ok)} configurations failed to launch)", "",
             "| " + " | ".join(keys) + f" | ms | {score} |", "|" + "---|" * (len(keys) + 2)]
    for group in sorted({tuple(r[g] for g in group_by) for r in ok}):
        members = sorted((r for r in ok if tuple(r[g] for g in group_by) == group), key=lambda r: r["t_s"])
        lines += ["| " + " | ".join(str(r[k]) for k in keys) + f" | {r['t_s'] * 1e3:.3f} | {r[score]:.1f} |"
                  for r in members[:3]]
    with open(os.path.join(out, f"kernels_gpu_sweep_{which}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_tables(out, meta, rows):
    names, copy_bw = list(VARIANTS), meta["copy_gbps"] * 1e9
    lines = [f"Device: {meta['device']}; device-to-device copy: {copy_bw / 1e9:.0f} GB/s", "",
             "Each variant: ms (cost over the same kernel without RoPE). table = cos/sin rows read per key; "
             "trig = computed in-kernel; table16 = fp16 tables; runs = key tiles turned by R(c) R(j); "
             "once = prefill keys rotated once into a scratch; packed = a prefill program takes all query heads "
             "of a KV head (its cost is over the packed kernel without RoPE). GB/s, % of copy and TFLOP/s from "
             "the fastest.", "",
             "| mode | heads q/kv | d | ctx | batch | page | max rel err | no-RoPE ms (packed) | torch ms | "
             + " | ".join(names) + " | best | GB/s (% copy) | TFLOP/s |",
             "|" + "---|" * (13 + len(names))]
    for r in rows:
        nope = r["t_nope_s"]
        cells = [f"{r['t_s'][n] * 1e3:.3f} ({(r['t_s'][n] / nope[layout(VARIANTS[n][1])] - 1) * 100:+.0f}%)"
                 if n in r["t_s"] else "-" for n in names]
        nope_cell = f"{nope['plain'] * 1e3:.3f}" + (f" ({nope['packed'] * 1e3:.3f})" if "packed" in nope else "")
        lines.append(f"| {r['mode']} | {r['h']}/{r['kvh']} | {r['d']} | {r['ctx']} | {r['batch']} | {r['page']} | "
                     f"{max(r['rel_err'].values()):.1e} | {nope_cell} | {r['t_torch_s'] * 1e3:.3f} | "
                     + " | ".join(cells) + f" | {r['best']} | {r['gbps']:.0f} ({r['gbps'] * 1e9 / copy_bw * 100:.0f}%)"
                     f" | {r['tflops']:.1f} |")
    with open(os.path.join(out, "kernels_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--sweep", choices=("decode", "prefill"), help="time launch configurations instead")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1 (a test)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    copy_bw = copy_bandwidth(device)
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "copy_gbps": copy_bw / 1e9}
    if args.sweep:
        run = sweep_decode if args.sweep == "decode" else sweep_prefill
        write_sweep(args.out, args.sweep, meta, *run(copy_bw, device, args.smoke))
        return
    cases = []
    for (h, kvh, d) in [(9, 3, 64), (32, 8, 128)]:
        for ctx in ((32,) if args.smoke else (1024, 4096, 16384, 32768)):
            # Batches large enough that the GPU, not the host, bounds a decode step.
            batch = {32: 2, 1024: 128, 4096: 64, 16384: 32, 32768: 16}[ctx]
            cases += [(h, kvh, d, ctx, batch, page, "decode") for page in ((16,) if args.smoke else (16, 32))]
            if ctx <= 16384:
                cases.append((h, kvh, d, ctx, 1, 32, "prefill"))
    rows, ropes = [], {}
    for (h, kvh, d, ctx, batch, page, mode) in tqdm(cases, desc="cases"):
        if d not in ropes:
            ropes[d] = RopeTable(d, 500000.0, device=device)
            ropes[d].ensure(32768)
        rows.append(run_case(Case(h, kvh, d, ctx, batch, page, mode, torch.bfloat16, ropes[d], device)))
    with open(os.path.join(args.out, "kernels_gpu.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    write_tables(args.out, meta, rows)


if __name__ == "__main__":
    main()
