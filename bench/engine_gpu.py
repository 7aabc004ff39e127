"""The engine end to end on a GPU: Triton backend on CUDA (its default kernels, with
runs + keys rotated once, and with runs + packed GQA) vs the torch reference backend
on CPU, same model, same trace, greedy tokens compared.

    python -m bench.engine_gpu --model SmolLM2-135M-Instruct.Q4_1.gguf --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.modes import make_trace
from mepic_ray import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    trace = make_trace(args.requests, args.chunks, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    report = {"device": torch.cuda.get_device_name(), "requests": args.requests, "chunks": args.chunks,
              "max_tokens": args.max_tokens, "modes": {}}
    setups = {"cpu": dict(device="cpu"), "cuda": dict(device="cuda"),
              "cuda_runs_once": dict(device="cuda", triton_rope_runs=True, triton_rotate_keys_once=True),
              "cuda_runs_packed": dict(device="cuda", triton_rope_runs=True, triton_pack_gqa=True)}
    for mode in ("full", "mepic"):
        runs = {}
        for name, setup in setups.items():
            llm = LLM(args.model, mode=mode, kv_cache_bytes=256 * 2**20, **setup)
            llm.generate(trace[:1], params)            # warm-up (Triton compiles its kernels)
            llm.reset_cache()
            t0 = time.perf_counter()
            outs = llm.generate(trace, params)
            wall = time.perf_counter() - t0
            runs[name] = {"backend": llm.engine.runner.backend, "wall_s": wall,
                          "tokens": [o.token_ids for o in outs],
                          "ttft_p50_s": sorted(o.stats.ttft_s for o in outs)[len(outs) // 2]}
        report["modes"][mode] = {f"{d}_{k}": v for d, r in runs.items() for k, v in r.items() if k != "tokens"}
        for name in setups:
            if name == "cpu":
                continue
            pairs = list(zip(runs["cpu"]["tokens"], runs[name]["tokens"]))
            report["modes"][mode][f"{name}_identical_requests"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
            report["modes"][mode][f"{name}_first_divergence"] = [
                next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in pairs]
        print(mode, report["modes"][mode], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
