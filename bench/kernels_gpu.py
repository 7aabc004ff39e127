"""Fused-RoPE paged attention on a GPU: correctness at real sizes and timings.

    python -m bench.kernels_gpu --out DIR

For each shape (SmolLM2: 9 q / 3 kv heads, head_dim 64; Llama-3-8B-like: 32 / 8,
head_dim 128) and context, it checks the Triton kernel against the torch
reference, then times decode (one query per sequence) and prefill (a full
causal sequence): fused RoPE, the same kernel without RoPE, and torch (rotate
gathered K, then scaled_dot_product_attention on contiguous K/V). Bandwidth is
compared with a measured device-to-device copy.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from kernels import RopeTable, apply_rope
from kernels.triton_attention import paged_attention_triton


def timeit(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x))
    return 2 * x.numel() / t


def case(h, kvh, d, ctx, batch, page, mode, dtype, rope):
    n_pages = ctx // page
    pool = torch.randn(batch * n_pages * page, kvh, d, device="cuda", dtype=dtype)
    vpool = torch.randn_like(pool)
    tables = torch.randperm(batch * n_pages, device="cuda").view(batch, n_pages).int()
    kv_pos = torch.arange(ctx, device="cuda").repeat(batch, 1).int()
    if mode == "decode":
        nq = 1
        q_logical = torch.full((batch,), ctx - 1, device="cuda")
    else:
        nq = ctx
        q_logical = torch.arange(ctx, device="cuda").repeat(batch)
    q = torch.randn(batch * nq, h, d, device="cuda", dtype=dtype)
    cu = [i * nq for i in range(batch + 1)]
    q_pos = q_logical.clone()
    cos_h, sin_h = rope.cos[:, : d // 2].contiguous(), rope.sin[:, : d // 2].contiguous()
    scale = 1 / math.sqrt(d)

    def fused(use_rope=True, in_kernel=False, rotate_once=False):
        return paged_attention_triton(q, q_pos, q_logical, cu, pool, vpool, tables, kv_pos, page,
                                      cos_h, sin_h, scale, use_rope=use_rope,
                                      inv_freq=rope.inv_freq if in_kernel else None, rotate_keys_once=rotate_once)

    def torch_ref():
        # Gather every sequence's pages into contiguous K/V, rotate K, then SDPA (batched).
        cos, sin = rope.cos[:ctx].to(dtype), rope.sin[:ctx].to(dtype)
        slots = (tables.long()[:, :, None] * page + torch.arange(page, device="cuda")).flatten(1)
        k = apply_rope(pool[slots].flatten(0, 1), cos.repeat(batch, 1), sin.repeat(batch, 1))
        k = k.view(batch, ctx, kvh, d).transpose(1, 2)
        v = vpool[slots].transpose(1, 2)
        qr = apply_rope(q, cos[q_pos], sin[q_pos]).view(batch, nq, h, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qr, k, v, is_causal=(mode == "prefill"), enable_gqa=True)
        return o.transpose(1, 2).reshape(batch * nq, h, d)

    want = torch_ref().float()
    rel_err = max(((fused(in_kernel=k).float() - want).abs().max() / want.abs().max()).item() for k in (False, True))
    t_fused, t_nope, t_torch = timeit(fused), timeit(lambda: fused(False)), timeit(torch_ref)
    t_trig = timeit(lambda: fused(in_kernel=True))
    # Prefill only: keys rotated once into a scratch, then read by the prefill kernel.
    t_once = None
    if mode == "prefill":
        rel_err = max(rel_err, ((fused(rotate_once=True).float() - want).abs().max() / want.abs().max()).item())
        t_once = timeit(lambda: fused(rotate_once=True))
    kv_bytes = 2 * batch * ctx * kvh * d * pool.element_size()
    causal = 0.5 if mode == "prefill" else 1.0
    best = min(t for t in (t_fused, t_trig, t_once) if t is not None)
    flops = 4 * batch * nq * ctx * h * d * causal
    return dict(mode=mode, h=h, kvh=kvh, d=d, ctx=ctx, batch=batch, page=page, dtype=str(dtype),
                rel_err=rel_err, t_fused_s=t_fused, t_trig_s=t_trig, t_once_s=t_once, t_nope_s=t_nope,
                t_torch_s=t_torch, rope_overhead=t_fused / t_nope - 1, trig_overhead=t_trig / t_nope - 1,
                once_overhead=None if t_once is None else t_once / t_nope - 1,
                fused_gbps=kv_bytes / best / 1e9, fused_tflops=flops / best / 1e12)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    copy_bw = copy_bandwidth()
    rows = []
    for (h, kvh, d) in [(9, 3, 64), (32, 8, 128)]:
        rope = RopeTable(d, 500000.0, device="cuda")
        rope.lookup(torch.tensor([40000]))
        for ctx in (1024, 4096, 16384, 32768):
            for page in (16, 32):
                # Batches large enough that the GPU, not the host, bounds a decode step.
                batch = {1024: 128, 4096: 64, 16384: 32, 32768: 16}[ctx]
                rows.append(case(h, kvh, d, ctx, batch, page, "decode", torch.bfloat16, rope))
                print(rows[-1], flush=True)
            if ctx <= 16384:
                rows.append(case(h, kvh, d, ctx, 1, 32, "prefill", torch.bfloat16, rope))
                print(rows[-1], flush=True)
    with open(os.path.join(args.out, "kernels_gpu.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": copy_bw / 1e9, "rows": rows}, f, indent=1)
    lines = [f"Device: {torch.cuda.get_device_name()}; device-to-device copy: {copy_bw / 1e9:.0f} GB/s", "",
             "Fused = RoPE from cos/sin tables; trig = RoPE computed in-kernel; once = prefill keys rotated "
             "once into a scratch, then read rotated; GB/s and TFLOP/s from the fastest.",
             "",
             "| mode | heads q/kv | d | ctx | batch | page | rel err | fused ms | trig ms | once ms | no-RoPE ms | torch ms "
             "| RoPE cost (table / trig / once) | GB/s (% copy) | TFLOP/s |",
             "|" + "---|" * 15]
    for r in rows:
        once_ms = "-" if r["t_once_s"] is None else f"{r['t_once_s'] * 1e3:.3f}"
        once_cost = "-" if r["once_overhead"] is None else f"{r['once_overhead'] * 100:+.0f}%"
        lines.append(f"| {r['mode']} | {r['h']}/{r['kvh']} | {r['d']} | {r['ctx']} | {r['batch']} | {r['page']} | "
                     f"{r['rel_err']:.1e} | {r['t_fused_s'] * 1e3:.3f} | {r['t_trig_s'] * 1e3:.3f} | {once_ms} | "
                     f"{r['t_nope_s'] * 1e3:.3f} | {r['t_torch_s'] * 1e3:.3f} | "
                     f"{r['rope_overhead'] * 100:+.0f}% / {r['trig_overhead'] * 100:+.0f}% / {once_cost} | "
                     f"{r['fused_gbps']:.0f} ({r['fused_gbps'] * 1e9 / copy_bw * 100:.0f}%) | "
                     f"{r['fused_tflops']:.1f} |")
    with open(os.path.join(args.out, "kernels_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
