"""Tables and plots of a fleet-simulator run: ``<out>.json``, ``<out>.md``, ``<out>.png``
(per workload: hit rate against the oracle's, load spread, TTFT p99 and decision time
against fleet size) and ``<out>_hit_over_time.png`` (hit rate per window of requests).

    python -m bench.fleet_report bench/results/fleet.json            # redraw a saved run
    python -m bench.fleet_report --merge a.json b.json --out bench/results/fleet   # runs side by side
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# What the issue asks of chunk affinity, at every fleet size and workload.
TARGET_HIT_OVER_ORACLE = 0.9
TARGET_MAX_OVER_MEAN = 1.25
TARGET_DECISION_P99_MS = 1.0
TARGET_FLAT = 0.02      # steady-state hit-rate change per 10,000 requests, at most this much downwards

COLORS = {"round_robin": "#999999", "power_of_two": "#6699cc", "prefix_tree": "#cc9933", "dynamo": "#66aa66",
          "chunk_affinity_legacy": "#dd8888", "chunk_affinity": "#cc3333", "oracle_bounded": "#3355aa",
          "oracle": "#000000"}


def oracle_of(runs: list[dict], workload: str, replicas: int, name: str = "oracle") -> float | None:
    return next((r["hit_rate"] for r in runs if r["workload"] == workload and r["replicas"] == replicas
                 and r["policy"] == name), None)


def with_ratios(runs: list[dict]) -> list[dict]:
    for r in runs:
        o = oracle_of(runs, r["workload"], r["replicas"])
        b = oracle_of(runs, r["workload"], r["replicas"], "oracle_bounded")
        r["hit_over_oracle"] = r["hit_rate"] / o if o else None
        r["hit_over_bounded"] = r["hit_rate"] / b if b else None
    return runs


def ratio_text(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def target_checks(r: dict) -> dict:
    """Load is time-averaged ongoing requests per replica (Serve's queue length, what a
    router balances); requests served are reported beside it."""
    return {"hit": r["hit_over_oracle"] is not None and r["hit_over_oracle"] >= TARGET_HIT_OVER_ORACLE,
            "hit_bounded": r["hit_over_bounded"] is not None and r["hit_over_bounded"] >= TARGET_HIT_OVER_ORACLE,
            "balance": r["max_over_mean_load"] <= TARGET_MAX_OVER_MEAN,
            "flat": r["steady_slope_per_10k"] >= -TARGET_FLAT,
            "decision": r["replicas"] < 256 or r["decision_p99_ms"] <= TARGET_DECISION_P99_MS}


def markdown(results: dict) -> str:
    runs = with_ratios(results["runs"])
    st = results["service_times"]
    a = results["args"]
    commands = results.get("commands") or [results["command"]]
    lines = ["# Fleet simulator", "", "Command" + ("s (a row of a later one replaces the same row of an earlier one, "
                                                  "then `python -m bench.fleet_report --merge ...`)"
                                                  if len(commands) > 1 else "") + ": " +
             ", ".join(f"`{c}`" for c in commands), "",
             f"Service times (from `{a['calibration']}`): prefill {st['a_s']:.3f} s + {st['b_s_per_token'] * 1e3:.3f} ms "
             f"per token + {st['c2_s_per_pair'] * 1e6:.4f} µs per attention pair; decode step {st['d0_s'] * 1e3:.0f} ms "
             f"+ {st['d1_s_per_seq'] * 1e3:.1f} ms per sequence. Pools of {a['pool_blocks']} blocks of 16 tokens; "
             f"{a['tenants_per_replica']:g} tenant(s) per replica, {a['docs_per_tenant']} documents each, 4 per "
             f"request; arrival rate for {a['utilization']:g} of the fleet's prefill time at a "
             f"{a['reference_hit_rate']:g} hit rate; routing stats every {a['stats_period_s']:g} s; "
             f"{a['ingresses']} ingress router(s).", "",
             "Hit rate: chunks found in the serving replica's pool at admission. Copies: resident (replica, chunk) "
             "pairs per distinct resident chunk, averaged after the first 20% of the trace. Served and load: max/mean "
             "of requests served and of time-averaged ongoing requests per replica. Slope: steady-state hit-rate "
             "change per 10,000 requests (after the first 20%). Decision: CPU time of the policy's choice (collector paused).", ""]
    for wl in dict.fromkeys(r["workload"] for r in runs):
        lines += [f"## {wl}", "", "| replicas | policy | hit rate | / oracle | / bounded oracle | copies | chunk KV blocks | "
                  "served | load | TTFT p50 | TTFT p99 | decision p50 | decision p99 | slope /10k |", "|" + "---|" * 14]
        for r in (x for x in runs if x["workload"] == wl):
            trunc = f" (truncated at {r['requests']})" if r["truncated"] else ""
            lines.append(f"| {r['replicas']} | {r['policy']}{trunc} | {r['hit_rate']:.3f} | "
                         f"{_ratio(r['hit_over_oracle'])} | {_ratio(r['hit_over_bounded'])} | "
                         f"{r['copies_per_chunk']:.2f} | {r['chunk_kv_blocks']:.0f} | {r['max_over_mean_served']:.2f} | "
                         f"{r['max_over_mean_load']:.2f} | {r['ttft_p50_s']:.2f} s | {r['ttft_p99_s']:.2f} s | "
                         f"{r['decision_p50_ms']:.3f} ms | {r['decision_p99_ms']:.3f} ms | "
                         f"{r['steady_slope_per_10k']:+.3f} |")
        lines.append("")
    lines += ["## Targets (chunk affinity)", "",
              f"Hit rate ≥ {TARGET_HIT_OVER_ORACLE} × the oracle's (which ignores load) and × the bounded oracle's; "
              f"max/mean load (time-averaged ongoing requests) ≤ {TARGET_MAX_OVER_MEAN}; steady-state slope ≥ "
              f"−{TARGET_FLAT} per 10,000 requests; decision p99 ≤ {TARGET_DECISION_P99_MS} ms at 256 replicas.", "",
              "| workload | replicas | policy | / oracle | / bounded oracle | load | (served) | slope | decision p99 | "
              "probes/request | router entries |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    mark = {True: "✓", False: "✗"}
    for r in runs:
        if not r["policy"].startswith("chunk_affinity"):
            continue
        ok = target_checks(r)
        mem = r["router_memory"][-1] if r.get("router_memory") else "-"
        probes = "-" if r.get("probes_per_request") is None else f"{r['probes_per_request']:.1f}"
        hit = "-" if r["hit_over_oracle"] is None else f"{r['hit_over_oracle']:.3f} {mark[ok['hit']]}"
        hit_b = "-" if r["hit_over_bounded"] is None else f"{r['hit_over_bounded']:.3f} {mark[ok['hit_bounded']]}"
        lines.append(f"| {r['workload']} | {r['replicas']} | {r['policy']} | {hit} | {hit_b} | "
                     f"{r['max_over_mean_load']:.2f} {mark[ok['balance']]} | {r['max_over_mean_served']:.2f} | "
                     f"{r['steady_slope_per_10k']:+.3f} {mark[ok['flat']]} | {r['decision_p99_ms']:.3f} ms "
                     f"{mark[ok['decision']]} | {probes} | {mem} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = with_ratios(results["runs"])
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    metrics = [("hit_over_oracle", "hit rate / oracle's", TARGET_HIT_OVER_ORACLE),
               ("max_over_mean_load", "max/mean load", TARGET_MAX_OVER_MEAN),
               ("ttft_p99_s", "TTFT p99 (s)", None), ("decision_p99_ms", "decision p99 (ms)", TARGET_DECISION_P99_MS)]
    fig, axes = plt.subplots(len(workloads), len(metrics), figsize=(4 * len(metrics), 3.2 * len(workloads)),
                             squeeze=False)
    for i, wl in enumerate(workloads):
        for j, (key, title, target) in enumerate(metrics):
            ax = axes[i][j]
            for pol in dict.fromkeys(r["policy"] for r in runs):
                rows = [r for r in runs if r["workload"] == wl and r["policy"] == pol and r[key] is not None]
                if rows:
                    ax.plot([r["replicas"] for r in rows], [r[key] for r in rows], marker="o", label=pol,
                            color=COLORS.get(pol))
                    cut = [r for r in rows if r["truncated"]]     # stopped at the time budget: warm-up only
                    ax.plot([r["replicas"] for r in cut], [r[key] for r in cut], "x", color="k", ms=9)
            if target is not None:
                ax.axhline(target, ls="--", color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            if key in ("ttft_p99_s", "decision_p99_ms", "max_over_mean_load"):
                ax.set_yscale("log")
            ax.set_title(f"{wl}: {title}", fontsize=9)
            ax.set_xlabel("replicas")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.legend(handles, labels, loc="center right", fontsize=8, title="x: truncated run", title_fontsize=7)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    big = max(r["replicas"] for r in runs)
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 3.2), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        for r in (x for x in runs if x["workload"] == wl and x["replicas"] == big):
            w = r["hit_rate_windows"]
            ax.plot([(k + 1) * results["args"].get("window", 1000) for k in range(len(w))], w, label=r["policy"],
                    color=COLORS.get(r["policy"]))
        ax.set_title(f"{wl}, {big} replicas: hit rate per 1000 requests", fontsize=9)
        ax.set_xlabel("requests")
        ax.set_ylim(0, 1)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.savefig(out.with_name(out.name + "_hit_over_time.png"), dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    plots(results, out)
    print(text)


def merge(paths: list[Path]) -> dict:
    """The runs of several files; a row of a later file replaces an earlier one of the
    same workload, fleet size and policy."""
    parts = [json.loads(p.read_text()) for p in paths]
    out = dict(parts[0])
    out["commands"] = [p["command"] for p in parts]
    rows: dict = {}
    for p in parts:
        for r in p["runs"]:
            rows[(r["workload"], r["replicas"], r["policy"])] = r
    order = {w: i for i, w in enumerate(dict.fromkeys(r["workload"] for p in parts for r in p["runs"]))}
    out["runs"] = sorted(rows.values(), key=lambda r: (order[r["workload"]], r["replicas"]))
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--merge":
        i = sys.argv.index("--out")
        write_report(merge([Path(p) for p in sys.argv[2:i]]), Path(sys.argv[i + 1]))
    else:
        path = Path(sys.argv[1])
        write_report(json.loads(path.read_text()), path.with_suffix(""))
