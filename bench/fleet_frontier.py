"""What the chunk-affinity router's load rules trade: hit rate against balance for a grid of
``RankerConfig`` load settings, beside the oracle (which ignores load) and the bounded
oracle, and where each policy's misses come from: ``cold`` (the chunk was in no pool yet:
no policy finds it), ``elsewhere`` (in another replica's pool: a placement miss) and
``gone`` (evicted from every pool).

    python -m bench.fleet_frontier --replicas 32,256 --workloads churn,burst --out bench/results/fleet_frontier

Runs ``bench.fleet_sim`` on its default workloads (same traces, same seeds), so its rows
match that benchmark's."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench import fleet_sim
from bench.fleet_report import COLORS, TARGET_HIT_OVER_ORACLE, TARGET_MAX_OVER_MEAN, ratio_text, with_ratios
from router.ranker_config import RankerConfig

UNCAPPED = "imbalanced_abs_threshold=1000,imbalanced_rel_threshold=1000"
GRID = ("chunk_affinity", *(f"chunk_affinity:imbalanced_abs_threshold={a}" for a in (2, 8, 12, 16)),
        *(f"chunk_affinity:{UNCAPPED},max_load_ratio={c}" for c in (1.25, 1.5, 2, 3)), "oracle_bounded", "oracle")
X_MAX = 4.0     # the load axis ends here
SHORT = {"imbalanced_abs_threshold": "abs", "imbalanced_rel_threshold": "rel", "max_load_ratio": "cap"}


def label(policy: str, short: bool = False) -> str:
    """``chunk_affinity:max_load_ratio=2,...`` -> ``cap 2``; the shipped defaults -> ``defaults (abs 4)``,
    or ``default`` when ``short``."""
    name, _, opts = policy.partition(":")
    if name != "chunk_affinity":
        return name
    if not opts:
        return "default" if short else f"defaults (abs {RankerConfig().imbalanced_abs_threshold})"
    opts = opts.replace(UNCAPPED + ",", "")
    return ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in (kv.split("=") for kv in opts.split(",")))


def series(policy: str) -> str:
    return "cap" if "max_load_ratio" in policy else "abs" if policy.startswith("chunk_affinity") else policy


def best_in_target(rows: list[dict]) -> dict | None:
    ok = [r for r in rows
          if r["policy"].startswith("chunk_affinity") and r["max_over_mean_load"] <= TARGET_MAX_OVER_MEAN]
    return max(ok, key=lambda r: r["hit_rate"], default=None)


def markdown(results: dict) -> str:
    runs = with_ratios(results["runs"])
    lines = ["# Chunk affinity: hit rate against balance", "", f"Command: `{results['command']}`", "",
             "Rows: the router's load rules (`abs`: `imbalanced_abs_threshold`, with the relative test at 1.5; "
             "`cap`: `max_load_ratio` alone, the other tests off). Load: max/mean of time-averaged ongoing requests "
             "per replica. Misses, as fractions of all chunk uses: cold (in no pool yet), elsewhere (in another "
             "replica's pool at admission), gone (evicted from every pool).", ""]
    for wl in dict.fromkeys(r["workload"] for r in runs):
        for n in dict.fromkeys(r["replicas"] for r in runs if r["workload"] == wl):
            rows = [r for r in runs if r["workload"] == wl and r["replicas"] == n]
            lines += [f"## {wl}, {n} replicas", "",
                      "| policy | hit rate | / oracle | / bounded oracle | load | served | TTFT p50 | TTFT p99 | "
                      "cold | elsewhere | gone | in target |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                ok = (r["hit_over_oracle"] or 0) >= TARGET_HIT_OVER_ORACLE and \
                    r["max_over_mean_load"] <= TARGET_MAX_OVER_MEAN
                lines.append(f"| {label(r['policy'])} | {r['hit_rate']:.3f} | {ratio_text(r['hit_over_oracle'])} | "
                             f"{ratio_text(r['hit_over_bounded'])} | {r['max_over_mean_load']:.2f} | "
                             f"{r['max_over_mean_served']:.2f} | {r['ttft_p50_s']:.1f} s | {r['ttft_p99_s']:.1f} s | "
                             f"{r['miss_cold']:.3f} | {r['miss_elsewhere']:.3f} | {r['miss_gone']:.3f} | "
                             f"{'✓' if ok else '✗'} |")
            best = best_in_target(rows)
            if best is not None and best["hit_over_oracle"] is not None:
                lines += ["", f"Best chunk affinity within load {TARGET_MAX_OVER_MEAN}: {label(best['policy'])}, "
                              f"{best['hit_over_oracle']:.3f} × the oracle's hit rate; the cold misses alone cap "
                              f"any policy at {1 - best['miss_cold']:.3f}."]
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = with_ratios(results["runs"])
    panels = list(dict.fromkeys((r["workload"], r["replicas"]) for r in runs))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.4), squeeze=False)
    for j, (wl, n) in enumerate(panels):
        rows = [r for r in runs if r["workload"] == wl and r["replicas"] == n and r["hit_over_oracle"] is not None]
        ax = axes[0][j]
        ax.axvspan(0.95, TARGET_MAX_OVER_MEAN, ymin=0, ymax=1, color="#e8f4e8")
        ax.axhline(TARGET_HIT_OVER_ORACLE, ls="--", color="k", lw=0.8)
        ax.axvline(TARGET_MAX_OVER_MEAN, ls="--", color="k", lw=0.8)
        for s, style in (("abs", "o-"), ("cap", "s-")):
            pts = sorted(((r["max_over_mean_load"], r["hit_over_oracle"], r) for r in rows if series(r["policy"]) == s),
                         key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color="#cc3333" if s == "abs" else "#ee9966",
                    label=f"chunk affinity, {s}", ms=5)
            for x, y, r in pts:
                ax.annotate(label(r["policy"], short=True), (x, y), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        for name, mark in (("oracle_bounded", "D"), ("oracle", "*")):
            for r in (r for r in rows if r["policy"] == name):
                x = min(r["max_over_mean_load"], X_MAX)     # the oracle's load is off the axis: drawn at its edge
                ax.plot([x], [r["hit_over_oracle"]], mark, color=COLORS[name], label=name, ms=8)
                if x < r["max_over_mean_load"]:
                    ax.annotate(f"load {r['max_over_mean_load']:.0f} →", (x, r["hit_over_oracle"]), fontsize=7,
                                xytext=(-52, -12), textcoords="offset points")
        ax.set_xlim(0.95, X_MAX * 1.05)
        ax.set_xticks([1, TARGET_MAX_OVER_MEAN, 1.5, 2, 2.5, 3, 3.5, 4])
        ax.set_xlabel("max/mean load")
        ax.set_ylabel("hit rate / oracle's")
        ax.set_title(f"{wl}, {n} replicas", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
        ax = axes[1][j]
        names = [label(r["policy"], short=True) for r in rows]
        bottom = [0.0] * len(rows)
        for key, color in (("hit_rate", "#cc3333"), ("miss_elsewhere", "#ee9966"), ("miss_gone", "#999999"),
                           ("miss_cold", "#333333")):
            vals = [r[key] for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottom, color=color, label=key.replace("miss_", "miss: "))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_title("chunk uses: hits and misses by cause", fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", default="32,256")
    ap.add_argument("--workloads", default="churn,burst")
    ap.add_argument("--policies", default=";".join(GRID), help="as bench.fleet_sim's, ';' between them")
    ap.add_argument("--min-requests", type=int, default=10_000)
    ap.add_argument("--requests-per-replica", type=int, default=160)
    ap.add_argument("--time-budget-s", type=float, default=900.0)
    ap.add_argument("--out", default="bench/results/fleet_frontier")
    args = ap.parse_args(argv)
    results = fleet_sim.main(["--replicas", args.replicas, "--workloads", args.workloads, "--policies", args.policies,
                              "--min-requests", str(args.min_requests),
                              "--requests-per-replica", str(args.requests_per_replica),
                              "--time-budget-s", str(args.time_budget_s), "--out", ""])
    results["command"] = "python -m bench.fleet_frontier " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(results)        # adds each row's ratios to the oracles
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    plot(results, out)
    print(text)
    return results


if __name__ == "__main__":
    main()
