"""How far each mode's SQuAD F1 is from full recompute's and from EPIC's, with a
paired bootstrap 95% interval, from the answers a ``bench.rag`` run committed.

    python -m bench.f1_ci bench/results/rag_high_reuse.json bench/results/rag_quality.json \
        bench/results/rag.json --out bench/results/f1_ci.md

SmolLM2-135M's answers score low and vary a lot per question, so a difference of
a few hundredths over a few dozen requests can be noise; resampling the requests
(the same requests for both modes: the comparison is paired) says how much.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
from pathlib import Path

from bench.squad import build_trace, score


def run_args(command: str) -> dict[str, str]:
    toks = shlex.split(command)
    return {t[2:].replace("-", "_"): v for t, v in zip(toks, toks[1:]) if t.startswith("--")}


def paired_ci(a: list[float], b: list[float], reps: int, seed: int) -> tuple[float, float, float]:
    """Mean of a - b and its 2.5 / 97.5 percentiles over resampled requests."""
    d = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(reps))
    return sum(d) / len(d), means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="bench.rag JSON files")
    ap.add_argument("--reps", type=int, default=10000)
    ap.add_argument("--out", default="bench/results/f1_ci.md")
    ap.add_argument("--plot", default=None, help="PNG: ΔF1 vs full (95%% interval) against peak KV blocks")
    args = ap.parse_args()
    points = []     # (label, peak blocks, ΔF1 vs full, lo, hi)
    lines = ["# F1 against full recompute, with paired bootstrap intervals\n",
             f"Command: `python -m bench.f1_ci {' '.join(args.results)} --reps {args.reps} --out {args.out}`\n",
             "ΔF1 = mode's F1 − the baseline's F1 on the same requests; the interval resamples requests "
             f"({args.reps} draws). An interval that contains 0 means the run cannot tell the two apart.\n",
             "| run | requests | mode | F1 | ΔF1 vs full [95%] | ΔF1 vs epic [95%] |", "|---|---|---|---|---|---|"]
    for path in args.results:
        data = json.loads(Path(path).read_text())
        a = run_args(data["command"])
        for run in data["runs"]:
            if "full" not in run["modes"]:
                continue
            trace = build_trace(int(a["requests"]), run["chunks"], float(a["reuse"]), int(a["pool"]), int(a["seed"]))
            f1 = {mode: [score(ans, r.answers)[1] for ans, r in zip(m["answers"], trace)]
                  for mode, m in run["modes"].items()}
            for mode, m in run["modes"].items():
                if abs(sum(f1[mode]) / len(trace) - m["f1"]) > 1e-9:
                    raise RuntimeError(f"{path}: rebuilt trace does not reproduce {mode}'s F1")
                if mode == "full":
                    continue
                cells = []
                for base in ("full", "epic"):
                    if base not in f1 or base == mode:
                        cells.append("")
                        continue
                    mean, lo, hi = paired_ci(f1[mode], f1[base], args.reps, seed=0)
                    cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
                    if base == "full":
                        points.append((mode, m["peak_blocks"], mean, lo, hi))
                lines.append(f"| {Path(path).stem}: {run['chunks']} chunks, {run['qps']} req/s | {len(trace)} | {mode} "
                             f"| {m['f1']:.3f} | {' | '.join(cells)} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.plot:
        plot(points, args.plot, " ".join(args.results))


def plot(points: list[tuple], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, peak, mean, lo, hi in points:
        ax.errorbar(peak, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=4)
        ax.annotate(label, (peak, mean), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("peak KV blocks")
    ax.set_ylabel("ΔF1 vs full recompute (95% interval)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
