"""MEPIC vs full / prefix / naive / EPIC / CacheBlend on a SQuAD RAG trace, every
mode in one process, requests arriving as a Poisson process.

    python -m bench.rag --chunks 16 --reuse 0.9 --qps 0.5 --requests 24 --out bench/results/rag
    python -m bench.rag --chunks 2,4,8,16 --qps 0.5 --requests 12 --out bench/results/rag_chunks
    python -m bench.rag --chunks 8 --qps 0.25,0.5,1 --requests 12 --out bench/results/rag_qps

Writes ``OUT.json`` (per run, per mode: peak_blocks, mean_blocks,
recomputed_tokens_per_request, ttft_p50_s, ttft_p95_s, e2e_p50_s, f1, em,
agreement_with_full, ...), ``OUT.md`` and PNG plots: KV blocks over time per
mode, and peak blocks / latency against a swept parameter.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from bench.common import pct, split_configs
from bench.fidelity import parse_config
from bench.squad import build_trace, score, workload_stats
from mepic_ray import LLM, SamplingParams

MODES = ["full", "prefix", "naive", "epic", "cacheblend", "mepic"]


def run_mode(llm: LLM, trace, qps: float, seed: int, params: SamplingParams, bar) -> dict:
    """Replays the trace at Poisson arrivals against the engine's own step loop."""
    eng = llm.engine
    rng = random.Random(seed)
    arrivals = list(itertools.accumulate(rng.expovariate(qps) for _ in trace))
    outputs, timeline, order = {}, [], {}
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(trace) or eng.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(trace) and arrivals[nxt] <= now:
            req = eng.make_request(trace[nxt].prompt, params, request_id=f"r{nxt}")
            req.stats.arrival_s = t0 + arrivals[nxt]     # latency counts from the scheduled arrival
            order[req.request_id] = nxt
            eng.enqueue(req)
            nxt += 1
        if not eng.has_unfinished():
            time.sleep(min(0.05, max(0.0, arrivals[nxt] - now)))
            continue
        for out in eng.step():
            if out.finished:
                outputs[order[out.request_id]] = out
                bar.update(1)
        s = eng.stats()
        timeline.append((time.perf_counter() - t0, s["used_blocks"]))
    outs = [outputs[i] for i in range(len(trace))]
    span = max(o.stats.finished_s for o in outs) - t0
    # Time-weighted mean of pages in use, from the first arrival to the last finish.
    mean_blocks = sum((t1 - ta) * b for (ta, b), (t1, _) in zip(timeline, timeline[1:])) / max(
        timeline[-1][0] - timeline[0][0], 1e-9)
    scores = [score(o.text, r.answers) for o, r in zip(outs, trace)]
    return {
        "peak_blocks": eng.kv.pool.peak_used, "mean_blocks": mean_blocks,
        "recomputed_tokens_per_request": statistics.mean(o.stats.recomputed_tokens for o in outs),
        "computed_tokens_per_request": statistics.mean(o.stats.computed_tokens for o in outs),
        "compiled_tokens_per_request": statistics.mean(o.stats.compiled_tokens for o in outs),
        "prompt_tokens_per_request": statistics.mean(o.stats.prompt_tokens for o in outs),
        "ttft_p50_s": statistics.median(o.stats.ttft_s for o in outs), "ttft_p95_s": pct([o.stats.ttft_s for o in outs], 0.95),
        "e2e_p50_s": statistics.median(o.stats.e2e_s for o in outs), "e2e_p95_s": pct([o.stats.e2e_s for o in outs], 0.95),
        "throughput_rps": len(outs) / span,
        "output_tokens_per_s": sum(len(o.token_ids) for o in outs) / span,
        "em": statistics.mean(s[0] for s in scores), "f1": statistics.mean(s[1] for s in scores),
        "answers": [o.text for o in outs], "timeline": timeline,
    }


def run_config(args, chunks: int, qps: float) -> dict:
    trace = build_trace(args.requests, chunks, args.reuse, args.pool, args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop=["\n"])
    result = {"chunks": chunks, "qps": qps, "modes": {}}
    with tqdm(total=len(trace) * len(args.modes), desc=f"chunks={chunks} qps={qps}") as bar:
        for mode in args.modes:
            # "mepic@2": MEPIC recomputing the first two blocks of each reused chunk;
            # "mepic:block_ratio=0.25": any mode options (bench.fidelity.parse_config)
            base, options = parse_config(mode)
            if base == "mepic":
                options.setdefault("recompute_blocks", args.mepic_recompute_blocks)
            llm = LLM(args.model, mode=base, kv_cache_bytes=args.kv_bytes, max_num_batched_tokens=args.batch_tokens,
                      mode_options=options)
            if "workload" not in result:
                result["workload"] = workload_stats(trace, lambda s: len(llm.engine.encode(s)))
            result["modes"][mode] = run_mode(llm, trace, qps, args.seed, params, bar)
            del llm
    full = result["modes"].get("full")
    for m in result["modes"].values():
        m["agreement_with_full"] = (statistics.mean(a == b for a, b in zip(m["answers"], full["answers"]))
                                    if full else None)
    if "mepic" in result["modes"]:
        result["workload"]["mepic_recomputed_tokens_per_request"] = result["modes"]["mepic"][
            "recomputed_tokens_per_request"]
    return result


def table(run: dict) -> str:
    w = run["workload"]
    lines = [f"### {run['chunks']} chunks per request, {run['qps']} requests/s",
             f"\nWorkload: {w['requests']} requests, {w['mean_prompt_tokens']:.0f} prompt tokens per request, "
             f"reuse ratio {w['reuse_ratio']:.1%}, {w['distinct_passages']} distinct passages.\n",
             "| mode | peak blocks | mean blocks | recomputed tok/req | TTFT p50 | TTFT p95 | e2e p50 | req/s | EM | F1 "
             "| agrees with full |", "|" + "---|" * 11]
    for mode, m in run["modes"].items():
        agree = "" if m["agreement_with_full"] is None else f"{m['agreement_with_full']:.2f}"
        lines.append(f"| {mode} | {m['peak_blocks']} | {m['mean_blocks']:.0f} | {m['recomputed_tokens_per_request']:.0f} "
                     f"| {m['ttft_p50_s']:.2f} s | {m['ttft_p95_s']:.2f} s | {m['e2e_p50_s']:.2f} s "
                     f"| {m['throughput_rps']:.3f} | {m['em']:.3f} | {m['f1']:.3f} | {agree} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or GGUF; default: the embedded SmolLM2")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list; mepic@K recomputes K blocks per chunk, mode:key=value,... sets mode_options")
    ap.add_argument("--chunks", default="16", help="passages per request; a list sweeps")
    ap.add_argument("--qps", default="0.5", help="Poisson arrival rate; a list sweeps")
    ap.add_argument("--reuse", type=float, default=0.9)
    ap.add_argument("--pool", type=int, default=24, help="hot passages the questions and reused distractors come from")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--kv-bytes", type=int, default=2 * 2**30)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--mepic-recompute-blocks", type=int, default=1, help="leading blocks of a reused chunk recomputed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/rag")
    args = ap.parse_args()
    args.modes = split_configs(args.modes)
    chunk_list = [int(x) for x in args.chunks.split(",")]
    qps_list = [float(x) for x in args.qps.split(",")]
    runs = [run_config(args, c, q) for c, q in itertools.product(chunk_list, qps_list)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.rag " + " ".join(f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ','.join(v)}"
                                                for k, v in vars(args).items() if v is not None and k != "model")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
    md = [f"# SQuAD RAG trace, all modes\n\nCommand: `{command}`\n",
          "Embedded SmolLM2-135M-Instruct, fp32, CPU (2 cores), block size 16. Blocks are KV pages in use "
          "(referenced by a running request); agreement is exact equality of the answer text with `full`.\n"]
    md += [table(r) + "\n" for r in runs]
    from bench.plots import plot_runs
    md += plot_runs(runs, out)
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
