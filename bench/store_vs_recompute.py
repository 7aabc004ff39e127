"""Load a chunk from the object-store tier vs compile it, per chunk length.

For each length the same request (instruction + one chunk + question) runs twice
on a cold pool: once compiling the chunk, once loading its pages from the store
(written there by the first run). Reports TTFT of both, the fetch time and bytes,
and what the engine's cost model would choose.

    python -m bench.store_vs_recompute --out bench/results/store_vs_recompute
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import ray
from tqdm.auto import tqdm

from mepic_ray import LLM, Chunk, SamplingParams, StoreConfig

WORDS = ("river mountain city history library engine garden winter harbor signal market bridge "
         "forest planet museum village language station").split()


def document(num_tokens: int, tag: int, encode) -> str:
    text, i = f"Document {tag}.", 0
    while len(encode(text)) < num_tokens:
        text += f" The {WORDS[(i * 7 + tag) % len(WORDS)]} number {i * 13 + tag} was recorded."
        i += 1
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF folder or GGUF; default: the embedded SmolLM2")
    ap.add_argument("--lengths", default="64,128,256,512,1024")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/store_vs_recompute")
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    llm = LLM(args.model, kv_cache_bytes=512 * 2**20,
              store=StoreConfig(name="bench_store", load_policy="always", budget_bytes=4 * 2**30))
    store = llm.engine.tier.client
    params = SamplingParams(max_tokens=1, temperature=0)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for n in tqdm(lengths, desc="chunk lengths"):
        compile_ttft, load_ttft, fetch_s, nbytes = [], [], [], 0
        for rep in range(args.reps + 1):        # the first repetition warms up and is dropped
            prompt = ["Answer from the document.\n", Chunk(document(n, 1000 * n + rep, llm.engine.encode)),
                      "\nQuestion: which number was recorded first?\nAnswer:"]
            llm.reset_cache()
            cold = llm.generate(prompt, params)[0]
            store.flush()
            llm.reset_cache()
            us, b = store.counts["load_us"], store.counts["load_bytes"]
            warm = llm.generate(prompt, params)[0]
            if warm.stats.compiled_tokens or not warm.stats.loaded_tokens:
                raise RuntimeError(f"length {n}: expected a load, got {warm.stats}")
            if rep:
                compile_ttft.append(cold.stats.ttft_s)
                load_ttft.append(warm.stats.ttft_s)
                fetch_s.append((store.counts["load_us"] - us) / 1e6)
                nbytes = store.counts["load_bytes"] - b
        c = store.costs
        rows.append({"chunk_tokens": n, "bytes": nbytes,
                     "ttft_compile_s": statistics.median(compile_ttft), "ttft_load_s": statistics.median(load_ttft),
                     "fetch_s": statistics.median(fetch_s),
                     "cost_model_loads": nbytes * c.load_s_per_byte < n * c.compile_s_per_token})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python -m bench.store_vs_recompute --lengths {args.lengths} --reps {args.reps} --out {args.out}"
    model = Path(str(llm.engine.model_path)).name     # the name only: results never carry machine paths
    out.with_suffix(".json").write_text(json.dumps({"command": command, "model": model, "reps": args.reps,
                                                    "rows": rows}, indent=2))
    lines = ["# Object-store tier: load a chunk vs compile it\n", f"Command: `{command}`\n",
             f"Model `{model}` (fp32, CPU, 2 cores), one chunk per request on a cold pool, median of "
             f"{args.reps} repetitions after a warm-up; the load's TTFT includes the store lookup and fetch.\n",
             "| chunk tokens | KV bytes | TTFT compile | TTFT load | fetch | speed-up | cost model picks |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunk_tokens']} | {r['bytes'] / 2**20:.1f} MiB | {r['ttft_compile_s'] * 1e3:.0f} ms | "
                     f"{r['ttft_load_s'] * 1e3:.0f} ms | {r['fetch_s'] * 1e3:.1f} ms | "
                     f"{r['ttft_compile_s'] / r['ttft_load_s']:.1f}x | {'load' if r['cost_model_loads'] else 'compile'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["chunk_tokens"] for r in rows]
    ax.plot(xs, [r["ttft_compile_s"] * 1e3 for r in rows], "o-", label="compile the chunk")
    ax.plot(xs, [r["ttft_load_s"] * 1e3 for r in rows], "s-", label="load from the object store")
    ax.plot(xs, [r["fetch_s"] * 1e3 for r in rows], "^--", label="fetch alone")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk tokens")
    ax.set_ylabel("ms")
    ax.set_title("TTFT with a cold pool: compile vs load (SmolLM2-135M, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
