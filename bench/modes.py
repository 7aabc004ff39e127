"""Peak KV blocks and recomputed tokens per mode on one small RAG trace.

    python -m bench.modes [--requests 12] [--chunks 4] [--out bench/results/modes.md]

Every request embeds `--chunks` documents drawn from a pool of 8, shuffled, so
the same documents recur in different orders. All requests are submitted at
once (continuous batching), which is where private copies (EPIC, CacheBlend)
cost memory per request and shared chunk pages (MEPIC) do not.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from tqdm import tqdm

from mepic_ray import LLM, Chunk, SamplingParams

TOPICS = ["the Eiffel Tower", "Mount Everest", "the Amazon river", "the Great Wall", "Jupiter",
          "the Pacific Ocean", "the Sahara desert", "the Moon"]


def make_doc(i: int) -> str:
    t = TOPICS[i]
    return (f"Document about {t}. " + f"{t.capitalize()} has been studied for centuries, and records "
            f"about {t} describe its size, its history and its importance to people. " * 3)


def make_trace(n_requests: int, n_chunks: int, seed: int) -> list[list]:
    rng = random.Random(seed)
    trace = []
    for r in range(n_requests):
        docs = rng.sample(range(len(TOPICS)), n_chunks)
        trace.append(["<|im_start|>user\nUse the documents.\n", *(Chunk(make_doc(d)) for d in docs),
                      f"\nWhat is document {r % n_chunks + 1} about?<|im_end|>\n<|im_start|>assistant\n"])
    return trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    trace = make_trace(args.requests, args.chunks, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    rows, reference = [], None
    for mode in tqdm(["full", "prefix", "naive", "epic", "cacheblend", "mepic"], desc="modes"):
        llm = LLM(args.model, mode=mode, kv_cache_bytes=512 * 2**20)
        t0 = time.perf_counter()
        outs = llm.generate(trace, params)
        wall = time.perf_counter() - t0
        tokens = [o.token_ids for o in outs]
        reference = reference or tokens
        rows.append({
            "mode": mode,
            "peak_blocks": llm.stats()["peak_used_blocks"],
            "recomputed_per_req": statistics.mean(o.stats.recomputed_tokens for o in outs),
            "computed_per_req": statistics.mean(o.stats.computed_tokens for o in outs),
            "prompt_tokens": statistics.mean(o.stats.prompt_tokens for o in outs),
            "ttft_p50_s": statistics.median(o.stats.ttft_s for o in outs),
            "wall_s": wall,
            "agree_full": sum(a == b for a, b in zip(tokens, reference)) / len(tokens),
        })
    head = "| mode | peak blocks | recomputed tok/req | computed tok/req | prompt tok | TTFT p50 s | wall s | agrees with full |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['peak_blocks']} | {r['recomputed_per_req']:.1f} | {r['computed_per_req']:.1f} "
                     f"| {r['prompt_tokens']:.0f} | {r['ttft_p50_s']:.2f} | {r['wall_s']:.1f} | {r['agree_full']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Modes on one trace\n\nCommand: `python -m bench.modes --requests {args.requests} "
                    f"--chunks {args.chunks} --max-tokens {args.max_tokens} --out {args.out}`\n\n"
                    f"Embedded SmolLM2-135M-Instruct, fp32, CPU (2 cores), block size 16, 512 MiB KV pool, all requests "
                    f"submitted at once.\n\n{table}\n")


if __name__ == "__main__":
    main()
