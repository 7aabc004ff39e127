"""Where a MEPIC prefill's time goes: seconds in the attention backend against seconds
in the MLP (whose work does not change with the attention code, so it normalises the
noise of a shared machine), on the 16-chunk high-reuse SQuAD trace, all requests at once.

    python -m bench.attention_share --label after --out after.json
    python -m bench.attention_share --merge before.json after.json --out bench/results/attention_share

Wraps only ``TorchAttention.__call__`` and ``MLP.forward``, which older versions have
too: run ``python <this tree>/bench/attention_share.py`` with ``PYTHONPATH`` at the
other version's tree for its figures, interleaving runs.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from bench.squad import build_trace
from mepic_ray import LLM, SamplingParams
from mepic_ray.worker import attention, model


def timed(cls, name: str, seconds: dict, label: str) -> None:
    f = getattr(cls, name)

    @functools.wraps(f)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            seconds[label] += time.perf_counter() - t
    setattr(cls, name, wrapper)


def run(args) -> dict:
    seconds = {"attention": 0.0, "mlp": 0.0}
    timed(attention.TorchAttention, "__call__", seconds, "attention")
    timed(model.MLP, "forward", seconds, "mlp")
    # Requests of the same hot pool of passages in new orders with new questions: the
    # first batch compiles the pool's chunks, each later one finds them all resident.
    trace = build_trace(args.requests * (args.rounds + 1), args.chunks, 1.0, args.pool, 0)
    batches = [trace[i:i + args.requests] for i in range(0, len(trace), args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop=["\n"])
    llm = LLM(None, mode="mepic", kv_cache_bytes=args.kv_bytes)
    llm.generate([r.prompt for r in batches[0]], params, use_tqdm=True)
    rounds = []
    for batch in batches[1:]:
        seconds.update(attention=0.0, mlp=0.0)
        t0 = time.perf_counter()
        llm.generate([r.prompt for r in batch], params, use_tqdm=True)
        rounds.append({"wall_s": time.perf_counter() - t0, **seconds})
    return {"label": args.label, "requests": args.requests, "chunks": args.chunks, "rounds": rounds}


def merge(paths: list[str], out: str) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    lines = ["# Attention against MLP time, MEPIC, every chunk resident", "",
             f"`python -m bench.attention_share --merge {' '.join(Path(p).name for p in paths)} --out {out}`; "
             f"runs made with `python -m bench.attention_share --label <label>` ({runs[0]['requests']} requests "
             f"of {runs[0]['chunks']} chunks at once), in the order listed.", "",
             "| run | wall (s) | attention (s) | MLP (s) | attention / MLP |", "|---|---|---|---|---|"]
    for r in runs:
        for x in r["rounds"]:
            lines.append(f"| {r['label']} | {x['wall_s']:.1f} | {x['attention']:.1f} | {x['mlp']:.1f} | "
                         f"{x['attention'] / x['mlp']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--kv-bytes", type=int, default=2**32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--label", default="run")
    ap.add_argument("--merge", nargs="+", help="tabulate runs (JSON files) in order")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.merge:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps([json.loads(Path(p).read_text()) for p in args.merge],
                                                       indent=1))
        Path(args.out + ".md").write_text(merge(args.merge, args.out))
        print(Path(args.out + ".md").read_text())
        return
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for x in result["rounds"]:
        print(f"{args.label} wall {x['wall_s']:.1f} attention {x['attention']:.1f} mlp {x['mlp']:.1f}")


if __name__ == "__main__":
    main()
