"""PNG plots for bench.rag, in the spirit of the MEPIC paper's figures 5-7."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_timeline(run: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, m in run["modes"].items():
        ts, bs = zip(*m["timeline"])
        ax.step(ts, bs, where="post", label=mode)
    ax.set_xlabel("seconds since the trace started")
    ax.set_ylabel("KV blocks in use")
    ax.set_title(f"KV blocks over time: {run['chunks']} chunks/request, {run['qps']} req/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(runs: list[dict], key: str, path: Path) -> None:
    xs = [r[key] for r in runs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in runs[0]["modes"]:
        a1.plot(xs, [r["modes"][mode]["peak_blocks"] for r in runs], "o-", label=mode)
        a2.plot(xs, [r["modes"][mode]["ttft_p50_s"] for r in runs], "o-", label=mode)
    label = {"chunks": "chunks per request", "qps": "requests per second"}[key]
    for ax, title in ((a1, "peak KV blocks"), (a2, "TTFT p50 (s)")):
        ax.set_xlabel(label)
        ax.set_title(title)
        ax.set_xticks(xs)
    a2.set_yscale("log")
    a1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_runs(runs: list[dict], out: Path) -> list[str]:
    """Writes the plots next to ``out`` and returns Markdown lines that show them."""
    lines = []
    for r in runs:
        p = out.parent / f"{out.name}_timeline_c{r['chunks']}_q{r['qps']}.png"
        plot_timeline(r, p)
        lines.append(f"![KV blocks over time, {r['chunks']} chunks, {r['qps']} req/s]({p.name})\n")
    for key in ("chunks", "qps"):
        if len({r[key] for r in runs}) > 1:
            p = out.parent / f"{out.name}_vs_{key}.png"
            plot_sweep(runs, key, p)
            lines.append(f"![peak KV blocks and TTFT vs {key}]({p.name})\n")
    return lines
