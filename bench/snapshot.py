"""Per-mode fingerprint of engine behaviour on a small SQuAD RAG trace: peak KV blocks,
recomputed / compiled / cached tokens and the greedy answers, with every request
submitted at once so the numbers do not depend on timing. Two snapshots taken
before and after a refactor must be equal.

    python -m bench.snapshot --out before.json
    python -m bench.snapshot --out after.json --compare before.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from bench.squad import build_trace
from mepic_ray import LLM, SamplingParams

MODES = ["full", "prefix", "naive", "epic", "cacheblend", "mepic"]


def snapshot(args) -> dict:
    trace = build_trace(args.requests, args.chunks, 0.9, args.pool, args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    out = {}
    for mode in tqdm(args.modes.split(","), desc="modes"):
        llm = LLM(args.model, mode=mode, kv_cache_bytes=args.kv_bytes)
        # Two waves: the second finds the first wave's chunks resident.
        half = len(trace) // 2
        res = llm.generate([r.prompt for r in trace[:half]], params)
        res += llm.generate([r.prompt for r in trace[half:]], params)
        out[mode] = {"peak_blocks": llm.engine.kv.pool.peak_used,
                     "recomputed_tokens": [o.stats.recomputed_tokens for o in res],
                     "compiled_tokens": [o.stats.compiled_tokens for o in res],
                     "cached_tokens": [o.stats.cached_tokens for o in res],
                     "answers": [o.text for o in res]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kv-bytes", type=int, default=256 * 2**20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None, help="an earlier snapshot: exit 1 unless equal")
    args = ap.parse_args()
    snap = snapshot(args)
    Path(args.out).write_text(json.dumps(snap, indent=1))
    for mode, m in snap.items():
        print(f"{mode:10s} peak_blocks={m['peak_blocks']:5d} recomputed={sum(m['recomputed_tokens']):6d} "
              f"compiled={sum(m['compiled_tokens']):6d} cached={sum(m['cached_tokens']):6d}")
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        diff = [(mode, k) for mode in snap for k in snap[mode] if old.get(mode, {}).get(k) != snap[mode][k]]
        print("equal to", args.compare if not diff else f"DIFFERENT from {args.compare}: {diff}")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
