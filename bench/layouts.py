"""Which prompt layouts keep chunk reuse close to full recompute, and what each reuse
option costs: teacher-forced fidelity (``mepic_ray.fidelity``) of each configuration
on the built-in calibration set (``mepic_ray.calibration_set``), per layout, with the
engine's peak KV blocks.

    python -m bench.layouts --layouts chat,chat_bare,plain,plain_headers --prompts 16 --passages 8 \
        --configs mepic,mepic:recompute_tokens=16,mepic:block_ratio=0.25,mepic:block_ratio=0.5,epic,cacheblend \
        --out bench/results/layouts

Layouts: ``chat`` is what the chat route sends (each chunk as ``Passage: ...``), ``chat_bare``
the same without the header, ``plain`` a completion prompt (instruction, passages,
"Question: ...\\nAnswer:"), ``plain_headers`` that with the headers. Requests run one at
a time on one engine per configuration, so the peak is one request's footprint plus the
chunks cached so far, not the sharing under load (``bench.rag`` measures that).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.common import split_configs
from bench.fidelity import parse_config
from mepic_ray.calibration_set import LAYOUTS, calibration_prompts
from mepic_ray.config import EngineConfig
from mepic_ray.engine import LLMEngine
from mepic_ray.fidelity import compare, greedy_answer, summary, teacher_forced_logprobs


def run(args) -> dict:
    base = EngineConfig(model=args.model, mode="full", kv_cache_bytes=args.kv_bytes)
    full = LLMEngine(base)
    configs = split_configs(args.configs)
    engines = {spec: LLMEngine(EngineConfig(model=args.model, mode=m, mode_options=o, kv_cache_bytes=args.kv_bytes))
               for spec, (m, o) in ((c, parse_config(c)) for c in configs)}
    layouts = args.layouts.split(",")
    out = {"command": "python -m bench.layouts " + " ".join(map(shlex.quote, sys.argv[1:])), "layouts": {}}
    bar = tqdm(total=len(layouts) * args.prompts * (1 + len(configs)), desc="layouts")
    for layout in layouts:
        prompts = calibration_prompts(full.tokenizer, full.cfg.separator, layout, args.prompts, args.passages)
        per, eos = {spec: [] for spec in configs}, 0
        for p in prompts:
            answer, reference = greedy_answer(full, p, args.max_tokens)
            eos += answer[0] in full.eos_ids
            bar.update(1)
            for spec, eng in engines.items():
                per[spec].append(compare(reference, teacher_forced_logprobs(eng, p, answer)))
                bar.update(1)
        rows = {}
        for spec, eng in engines.items():
            s = summary(per[spec])
            rows[spec] = {"first_token": s.first_token, "top1": s.top1, "kl": s.kl,
                          "peak_blocks": eng.stats()["peak_used_blocks"], "requests": per[spec]}
            eng.reset_cache()
            eng.kv.pool.peak_used = 0
        out["layouts"][layout] = {"full_answers_eos_first": eos, "configs": rows}
    bar.close()
    return out


def markdown(res: dict, seconds: float) -> str:
    lines = ["# Prompt layouts and reuse options against full recompute (teacher-forced)", "",
             f"`{res['command']}` ({seconds / 60:.0f} min on a 2-core CPU, embedded SmolLM2-135M)", ""]
    for layout, r in res["layouts"].items():
        n = len(next(iter(r["configs"].values()))["requests"])
        lines += [f"## {layout}", "", f"Full recompute itself answers end-of-sequence first on "
                  f"{r['full_answers_eos_first']} of {n} prompts.", "",
                  "| config | first-token agreement | top-1 agreement | KL(full ‖ config), nats | peak blocks |",
                  "|---|---|---|---|---|"]
        lines += [f"| {spec} | {c['first_token']:.3f} | {c['top1']:.3f} | {c['kl']:.4f} | {c['peak_blocks']} |"
                  for spec, c in r["configs"].items()]
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layout, r in res["layouts"].items():
        xs = [c["peak_blocks"] for c in r["configs"].values()]
        ys = [c["kl"] for c in r["configs"].values()]
        ax.scatter(xs, ys, label=layout)
        for spec, x, y in zip(r["configs"], xs, ys):
            ax.annotate(spec, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("peak KV blocks (one request at a time)")
    ax.set_ylabel("mean KL(full ‖ config), nats")
    ax.set_title("fidelity against KV blocks, per layout")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--layouts", default="chat,plain", help=f"comma list of {LAYOUTS}")
    ap.add_argument("--configs", default="mepic,mepic:block_ratio=0.25")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--kv-bytes", type=int, default=256 * 2**20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/layouts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = run(args)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res, time.perf_counter() - t0))
    plot(res, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
