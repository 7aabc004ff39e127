"""The model's fp32 products for a few rows: ``F.linear`` (x·Wᵀ) against the weight as
the left operand (W·xᵀ, what ``mepic_ray.worker.model.linear`` does up to 64 rows), over
one forward's weights of the embedded SmolLM2's shapes (30 layers and the LM head, about
540 MB, so each weight streams from memory as in a decode step).

    python -m bench.few_rows --out bench/results/few_rows
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (3072, 576), (576, 1536)]   # q, k, v, o, gate_up, down


def forward_s(weights, head, m: int, weight_left: bool) -> float:
    xs = {i: torch.randn(m, i) for i in (576, 1536)}
    t0 = time.perf_counter()
    for w in weights + [head]:
        x = xs[w.shape[1]]
        torch.mm(w, x.t()).t().contiguous() if weight_left else F.linear(x, w)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8,32,64,128,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/few_rows")
    args = ap.parse_args(argv)
    weights = [torch.randn(o, i) for _ in range(30) for o, i in SHAPES]
    head = torch.randn(49152, 576)
    rows = []
    for m in (int(x) for x in args.rows.split(",")):
        times = {False: [], True: []}
        for _ in range(args.repeats):           # interleaved, medians
            for left in times:
                times[left].append(forward_s(weights, head, m, left))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append({"rows": m, "linear_s": med[False], "weight_left_s": med[True]})
    lines = [f"`python -m bench.few_rows --rows {args.rows} --repeats {args.repeats}`: one forward's products "
             "(SmolLM2-135M shapes, fp32), median of interleaved repeats.\n",
             "| rows | x·Wᵀ (F.linear) | W·xᵀ | speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['linear_s'] * 1000:.1f} ms | {r['weight_left_s'] * 1000:.1f} ms | "
              f"{r['linear_s'] / r['weight_left_s']:.2f}× |" for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
