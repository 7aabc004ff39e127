"""How close each reuse mode's next-token distributions are to full recompute's, on
SQuAD RAG traces, at every position of full recompute's own answer.

    python -m bench.fidelity --configs full,naive,epic,cacheblend,mepic,mepic@2 \
        --formats plain,chat --chunks 4,8 --requests 12 --out bench/results/fidelity

For each request, ``full`` answers greedily (up to ``--max-tokens``, stopping at EOS,
which is kept as the last position). Every configuration then reads that answer
teacher-forced (``mepic_ray.fidelity``, the measurement the start-up quality gate
uses), and the distributions are compared position by position.

A configuration is ``mode``, ``mepic@K`` (recompute K blocks) or ``mode:key=value,...``
(``EngineConfig.mode_options``). Each runs on its own engine, requests one at a time in
trace order, so the chunk cache warms up over the trace as it would when serving.
"""
from __future__ import annotations

import argparse
import ast
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.common import split_configs
from bench.f1_ci import paired_ci
from bench.squad import build_trace
from mepic_ray import LLM, Chunk
from mepic_ray.fidelity import compare, greedy_answer, teacher_forced_logprobs

PLAIN_INSTRUCTION = "Answer the question with a short phrase taken from the passages.\n"


def parse_config(spec: str) -> tuple[str, dict]:
    """``mepic@2`` -> (mepic, {recompute_blocks: 2}); ``epic:recompute_tokens=32`` ->
    (epic, {recompute_tokens: 32}). Values are Python literals, else strings."""
    name, _, rest = spec.partition(":")
    mode, _, window = name.partition("@")
    options = {"recompute_blocks": int(window)} if window else {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"config {spec!r}: option {item!r} is not key=value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return mode, options


def plain_prompt(chat_prompt: list, question: str) -> list:
    """The same passages and question as ``bench.squad``'s chat layout, without the chat
    template or the "Passage:" headers."""
    passages = [Chunk(seg.text.removeprefix("Passage: ")) for seg in chat_prompt if isinstance(seg, Chunk)]
    return [PLAIN_INSTRUCTION, *passages, f"Question: {question}\nAnswer:"]


def evaluate(configs: list[str], prompts: list, make_llm, max_tokens: int, bar=None) -> dict:
    """Per configuration: per-request comparisons with full's greedy answer and peak KV
    blocks. ``make_llm(mode, options)`` builds a fresh engine."""
    eng = make_llm("full", {}).engine
    answers, refs, n_tok = [], [], []
    for i, p in enumerate(prompts):
        ids, rows = greedy_answer(eng, p, max_tokens)
        n = eng.make_request(p).stats.prompt_tokens
        answers.append(ids)
        refs.append(rows)
        n_tok.append(n)
        bar and bar.update(1)
    eos, text = eng.eos_ids, [eng.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    del eng
    result = {"answers": answers, "answer_text": text, "prompt_tokens": n_tok, "configs": {}}
    for spec in configs:
        mode, options = parse_config(spec)
        try:
            llm = make_llm(mode, options)
        except ValueError as e:     # an option the mode's policy does not take
            result["configs"][spec] = {"error": str(e)}
            print(f"skipping {spec}: {e}", file=sys.stderr)
            bar and bar.update(len(prompts))
            continue
        t0, reqs = time.perf_counter(), []
        for i, (p, a, ref) in enumerate(zip(prompts, answers, refs)):
            got = teacher_forced_logprobs(llm.engine, p, a)
            reqs.append(compare(ref, got) | {"first_argmax_eos": int(got[0].argmax()) in eos})
            bar and bar.update(1)
        result["configs"][spec] = {"mode": mode, "options": options, "requests": reqs,
                                   "peak_blocks": llm.stats()["peak_used_blocks"],
                                   "seconds": time.perf_counter() - t0}
        del llm
    return result


def summarize(result: dict, reps: int) -> dict:
    """Means over requests, with paired bootstrap intervals of each configuration's
    difference from the ``full`` configuration (from the ideal 0 KL, agreement 1 when
    ``full`` was not run)."""
    cfgs = {k: v for k, v in result["configs"].items() if "error" not in v}
    metrics = {"first_token": ("first_token", 1.0), "mean_kl": ("mean_kl", 0.0), "top1": ("top1_rate", 1.0)}
    out = {}
    for spec, c in cfgs.items():
        row = {"peak_blocks": c["peak_blocks"],
               "first_eos": statistics.mean(r["first_argmax_eos"] for r in c["requests"])}
        for name, (key, ideal) in metrics.items():
            vals = [float(r[key]) for r in c["requests"]]
            base = [float(r[key]) for r in cfgs["full"]["requests"]] if "full" in cfgs else [ideal] * len(vals)
            diff, lo, hi = paired_ci(vals, base, reps, seed=0)
            row[name] = {"mean": statistics.mean(vals), "diff": diff, "lo": lo, "hi": hi}
        out[spec] = row
    return out


def _cell(s: dict, metric: str, fmt: str) -> str:
    return f"{s[metric]['mean']:{fmt}} [{s[metric]['lo']:+{fmt}}, {s[metric]['hi']:+{fmt}}]"


def headline(runs: list[dict]) -> list[str]:
    """One line per configuration, one column per prompt format and passage count."""
    specs = list(dict.fromkeys(s for r in runs for s in r["summary"]))
    lines = ["First-token agreement / mean KL (nats) / peak blocks:\n",
             "| config | " + " | ".join(f"{r['format']}, {r['chunks']} passages" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for spec in specs:
        cells = [(f"{s['first_token']['mean']:.2f} / {s['mean_kl']['mean']:.3f} / {s['peak_blocks']}"
                  if (s := r["summary"].get(spec)) else "") for r in runs]
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(runs: list[dict], command: str) -> str:
    lines = ["# Logit-level fidelity of each reuse mode against full recompute\n",
             f"Command: `{command}`\n",
             "Embedded SmolLM2-135M-Instruct, fp32, CPU, block size 16. Each request's answer is full "
             "recompute's greedy one (EOS included); every configuration reads it teacher-forced. KL is "
             "KL(full ‖ mode) in nats, averaged over the answer's positions, then over requests; top-1 is the "
             "share of positions whose argmax equals full's; first token is that at position 0 alone; "
             "EOS first is the share of requests where the mode's most likely first token is EOS. Brackets: "
             "paired bootstrap 95% interval (over requests) of the difference from the `full` configuration, "
             "which is itself run teacher-forced and must read 0 / 1 / 1. Peak blocks: most KV pages "
             "referenced at once; requests run one at a time, so this is one request's footprint (with the "
             "chunk cache warm), not the concurrency effect `bench.rag` measures.\n", *headline(runs)]
    for run in runs:
        lines += [f"## {run['format']} prompts, {run['chunks']} passages per request\n",
                  f"{run['requests']} requests, {run['mean_prompt_tokens']:.0f} prompt tokens each, "
                  f"answers of {run['mean_answer_tokens']:.1f} tokens.\n",
                  "| config | peak blocks | first token [Δ 95%] | mean KL [Δ 95%] | top-1 [Δ 95%] | EOS first |",
                  "|---|---|---|---|---|---|"]
        for spec, s in run["summary"].items():
            lines.append(f"| {spec} | {s['peak_blocks']} | {_cell(s, 'first_token', '.2f')} "
                         f"| {_cell(s, 'mean_kl', '.3f')} | {_cell(s, 'top1', '.2f')} | {s['first_eos']:.2f} |")
        for spec, c in run["configs"].items():
            if "error" in c:
                lines.append(f"| {spec} | skipped: {c['error']} | | | | |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt     # savefig only: any backend will do
    markers, groups = "osD^vP*X", sorted({(r["format"], r["chunks"]) for r in runs})
    specs = list(dict.fromkeys(s for r in runs for s in r["summary"]))
    colors = {s: f"C{i}" for i, s in enumerate(specs)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        marker = markers[groups.index((run["format"], run["chunks"])) % len(markers)]
        for spec, s in run["summary"].items():
            # Hollow, growing with the config's index: configs at the same point nest as rings.
            ax.scatter(s["peak_blocks"], s["first_token"]["mean"], marker=marker, facecolors="none",
                       edgecolors=colors[spec], s=30 + 40 * specs.index(spec), linewidths=1.5)
    for spec in specs:      # legend entries: colour = configuration, marker = prompt group
        ax.scatter([], [], color=colors[spec], label=spec)
    for i, (fmt, c) in enumerate(groups):
        ax.scatter([], [], marker=markers[i % len(markers)], color="gray", label=f"{fmt}, {c} passages")
    ax.set(xlabel="peak KV blocks (one request in flight)", ylabel="first-token agreement with full",
           title="First-token agreement vs peak KV blocks, per configuration")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or GGUF; default: the embedded SmolLM2")
    ap.add_argument("--configs", default="full,naive,epic,cacheblend,mepic,mepic@2",
                    help="comma list: mode, mepic@K, or mode:key=value,key=value")
    ap.add_argument("--formats", default="plain,chat")
    ap.add_argument("--chunks", default="4,8", help="passages per request; a list sweeps")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--reuse", type=float, default=0.9)
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--kv-bytes", type=int, default=2 * 2**30)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    # On a machine other jobs share, torch's spinning OpenMP threads made one request take
    # anywhere from 4 to 20 s; a single thread took a steady 5 s.
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: torch's default")
    ap.add_argument("--out", default="bench/results/fidelity")
    args = ap.parse_args()
    command = "python -m bench.fidelity " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    configs, formats = split_configs(args.configs), args.formats.split(",")
    if bad := set(formats) - {"plain", "chat"}:
        ap.error(f"unknown formats {sorted(bad)}: plain, chat")

    def make_llm(mode, options):
        return LLM(args.model, mode=mode, kv_cache_bytes=args.kv_bytes, max_num_batched_tokens=args.batch_tokens,
                   mode_options=options)

    runs, t_start = [], time.perf_counter()
    for chunks in [int(c) for c in args.chunks.split(",")]:
        trace = build_trace(args.requests, chunks, args.reuse, args.pool, args.seed)
        for fmt in formats:
            prompts = [r.prompt if fmt == "chat" else plain_prompt(r.prompt, r.question) for r in trace]
            with tqdm(total=len(prompts) * (1 + len(configs)), desc=f"{fmt}, {chunks} passages") as bar:
                res = evaluate(configs, prompts, make_llm, args.max_tokens, bar)
            runs.append({"format": fmt, "chunks": chunks, "requests": len(prompts),
                         "mean_prompt_tokens": statistics.mean(res["prompt_tokens"]),
                         "mean_answer_tokens": statistics.mean(len(a) for a in res["answers"]),
                         "questions": [r.question for r in trace], "gold": [r.answers for r in trace],
                         **res, "summary": summarize(res, args.reps)})
    out, wall = Path(args.out), time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "wall_s": wall, "runs": runs}, indent=1))
    md = (markdown(runs, command) + f"\nWall time: {wall / 60:.1f} min.\n\n"
          f"![first-token agreement vs peak blocks]({out.name}.png)\n")
    plot(runs, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
