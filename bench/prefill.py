"""Prefill throughput on the embedded SmolLM2: a batch of fresh prompts, submitted at
once, one token each (so the time is the prefill's).

- ``full``: 8 prompts of 6 SQuAD passages as plain text (about 1,000 tokens each).
- ``mepic``: 8 prompts of 16 passages as chunks, in their own orders, every chunk
  already resident (what a high-reuse RAG trace prefills: recomputed first blocks and
  the question against resident pages).

    python -m bench.prefill --label after --out after.json
    python -m bench.prefill --merge before.json after.json --out bench/results/prefill

Uses only APIs older versions have too: run ``python <this tree>/bench/prefill.py``
with ``PYTHONPATH`` at the other version's tree for its figures, interleaving rounds.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm


def layouts(mode: str, round_: int, passages: list[str]):
    from mepic_ray import Chunk
    rng = random.Random(round_)
    if mode == "full":
        return [" ".join(rng.sample(passages, 6)) + f"\nQuestion {round_}.{i}: what is it about?\nAnswer:"
                for i in range(8)]
    return [["Answer from the passages.\n", *map(Chunk, rng.sample(passages, 16)),
             f"\nQuestion {round_}.{i}: what is it about?\nAnswer:"] for i in range(8)]


def measure(mode: str, rounds: int, dtype: str) -> dict:
    from bench.squad import load_paragraphs
    from mepic_ray import LLM, SamplingParams
    passages = [p.context for p in load_paragraphs(600)[:24]]
    llm = LLM(None, mode=mode, kv_cache_bytes=4 * 2**30, dtype=dtype)
    one = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(layouts(mode, 99, passages), one)     # warm-up; for mepic, every chunk resident
    walls, tokens = [], []
    for r in tqdm(range(rounds), desc=mode):
        t0 = time.perf_counter()
        outs = llm.generate(layouts(mode, r, passages), one)
        walls.append(time.perf_counter() - t0)
        tokens.append(sum(o.stats.prompt_tokens - o.stats.cached_tokens for o in outs))
    return {"wall_s": walls, "computed_tokens": tokens}


def merge(paths: list[str], out: Path) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    names = " ".join(Path(p).name for p in paths)
    lines = ["# Prefill throughput\n", f"`python -m bench.prefill --merge {names} --out {out}`, "
             f"runs made with `python -m bench.prefill --rounds {runs[0]['rounds']} --label <label>`, "
             f"dtype {runs[0]['dtype']}, 8 prompts a round.\n",
             "| mode | " + " | ".join(f"{r['label']} (s a round)" for r in runs) + " | first / last |",
             "|---|" + "---|" * (len(runs) + 1)]
    for mode in runs[0]["modes"]:
        means = [statistics.mean(r["modes"][mode]["wall_s"]) for r in runs]
        cells = [", ".join(f"{w:.2f}" for w in r["modes"][mode]["wall_s"]) for r in runs]
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {means[0] / means[-1]:.2f}× |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="full,mepic")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--label", default="run")
    ap.add_argument("--merge", nargs="+", help="tabulate runs (JSON files) side by side")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    res = {m: measure(m, args.rounds, args.dtype) for m in args.modes.split(",")}
    Path(args.out).write_text(json.dumps({"label": args.label, "rounds": args.rounds, "dtype": args.dtype,
                                          "modes": res}, indent=1))
    for m, r in res.items():
        print(args.label, m, " ".join(f"{w:.2f}" for w in r["wall_s"]))


if __name__ == "__main__":
    main()
