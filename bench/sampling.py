"""Sampling time per decode step, this tree's sampler against the one at a git revision
(``--before``), in one process, on SmolLM2's vocabulary: batches of 1 to 64 sampled
rows (temperature, top-k, top-p, each its own seeded generator), plus greedy rows.

    python -m bench.sampling --before <rev> --out bench/results/sampling
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch
from tqdm import tqdm

from mepic_ray.sampling_params import SamplingParams
from mepic_ray.worker import sampler as after

REPO = Path(__file__).resolve().parents[1]


def sampler_at(rev: str) -> types.ModuleType:
    src = subprocess.run(["git", "show", f"{rev}:mepic_ray/worker/sampler.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"sampler_{rev}")
    exec(compile(src, f"{rev}:sampler.py", "exec"), mod.__dict__)
    return mod


def mix(n: int) -> list[SamplingParams]:
    kinds = [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=50), dict(temperature=0.7),
             dict(temperature=0.6, top_k=40, top_p=0.95)]
    return [SamplingParams(seed=i, logprobs=5 if i % 2 else None, **kinds[i % len(kinds)]) for i in range(n)]


def time_step(fn_sample, fn_logprobs, logits, params, reps: int) -> float:
    times = []
    for _ in range(reps):
        gens = [torch.Generator().manual_seed(p.seed) for p in params]
        t0 = time.perf_counter()
        toks = fn_sample(logits, params, gens)
        fn_logprobs(logits, toks, params)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision of the sampler to compare with")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batches", default="1,4,16,32,64")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="bench/results/sampling")
    args = ap.parse_args()
    before = sampler_at(args.before)
    rows = []
    for b in tqdm([int(x) for x in args.batches.split(",")], desc="batch sizes"):
        logits = torch.randn(b, args.vocab, generator=torch.Generator().manual_seed(b)) * 3
        params = mix(b)
        gens = [[torch.Generator().manual_seed(p.seed) for p in params] for _ in range(2)]
        same = before.sample(logits, params, gens[0]) == after.sample(logits, params, gens[1])
        t_before = time_step(before.sample, before.token_logprobs, logits, params, args.reps)
        t_after = time_step(after.sample, after.token_logprobs, logits, params, args.reps)
        rows.append((b, t_before, t_after, same))
    lines = [f"`python -m bench.sampling --before {args.before} --vocab {args.vocab} --batches {args.batches} "
             f"--reps {args.reps} --out {args.out}`", "",
             f"Sampling plus log-probabilities for one decode step, vocabulary {args.vocab}, every row sampled "
             "(temperature, top-k and/or top-p, its own seeded generator; half ask for 5 log-probabilities); "
             f"median of {args.reps}, torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             f"| sampled rows | before ({args.before}) | after | before / after | same tokens |", "|---|---|---|---|---|"]
    for b, tb, ta, same in rows:
        lines.append(f"| {b} | {tb * 1e3:.2f} ms | {ta * 1e3:.2f} ms | {tb / ta:.2f}× | {'yes' if same else 'NO'} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
