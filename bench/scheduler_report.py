"""bench.scheduler's tables (a row per mode and label, a ratio row last / first) and its
inter-token latency CDF plot."""
from __future__ import annotations

from pathlib import Path


def fmt(v, unit: str) -> str:
    if isinstance(v, float):
        return f"{v * 1000:.0f} ms" if unit == "ms" else f"{v:.2f}{unit}"
    return "n/a" if v is None else f"{v}{unit}"


ITL_COLS = [("ITL p50", "itl_p50_s", "ms"), ("ITL p99", "itl_p99_s", "ms"), ("max gap", "itl_max_s", "ms"),
            ("TTFT p50", "ttft_p50_s", " s"), ("step p50", "step_p50_s", "ms"), ("step p99", "step_p99_s", "ms"),
            ("step max", "step_max_s", "ms"), ("preemptions", "preemptions", ""), ("peak blocks", "peak_blocks", ""),
            ("dedup limit", "dedup_limit_blocks", ""), ("peak/limit", "peak_over_limit", ""),
            ("running max", "running_max", ""), ("finished", "finished", ""), ("timed out", "timed_out", "")]
CAP_COLS = [("running max", "running_max", ""), ("running mean", "running_mean", ""), ("done", "done", ""),
            ("tokens/req", "tokens_per_request", ""), ("total time", "wall_s", " s"), ("steps", "steps", ""),
            ("preemptions", "preemptions", ""), ("peak blocks", "peak_blocks", ""), ("timed out", "timed_out", "")]


def table(title: str, cols, runs: list[dict], part: str) -> list[str]:
    """A row per (mode, label); with two or more labels, a row last / first per mode."""
    modes = list(dict.fromkeys(m for r in runs for m in r.get(part, {}).get("modes", {})))
    out = [f"### {title}\n", "| mode | label | " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for mode in modes:
        group = [(r["label"], r[part]["modes"][mode]) for r in runs if mode in r.get(part, {}).get("modes", {})]
        out += [f"| {mode} | {label} | " + " | ".join(fmt(m.get(k), u) for _, k, u in cols) + " |" for label, m in group]
        if len(group) > 1:
            (a, ma), (b, mb) = group[0], group[-1]
            num = [(ma.get(k), mb.get(k)) for _, k, _ in cols]
            ok = [all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xy) and xy[0] for xy in num]
            out.append(f"| {mode} | {b}/{a} | " + " | ".join(f"{y / x:.2f}x" if good else "n/a"
                                                            for (x, y), good in zip(num, ok)) + " |")
    return out + [""] if modes else []


def plot_cdf(runs: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        for mode, m in r.get("itl", {}).get("modes", {}).items():
            gaps = sorted(max(g, 1e-4) for g in m["itl_s"])
            if gaps:
                ax.step(gaps, [(i + 1) / len(gaps) for i in range(len(gaps))], where="post", label=f"{mode} ({r['label']})")
    ax.set(xscale="log", xlabel="inter-token latency (s)", ylabel="fraction of gaps", title="Inter-token latency CDF")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def write_report(runs: list[dict], out: Path, header: list[str]) -> str:
    md = header + table("Inter-token latency under Poisson load", ITL_COLS, runs, "itl")
    md += table("Capacity: requests running at once in a fixed pool", CAP_COLS, runs, "capacity")
    if any(r.get("itl") for r in runs):
        png = out.with_name(out.name + "_itl_cdf.png")
        plot_cdf(runs, png)
        md.append(f"![inter-token latency CDF]({png.name})\n")
    text = "\n".join(md)
    out.with_name(out.name + ".md").write_text(text)
    return text
