"""Routing policies across engine replicas on a multi-tenant SQuAD trace:
round robin, Ray Serve's default (power of two choices) and the chunk-affinity
router, against an oracle that knows every replica's pool.

    python -m bench.routing --replicas 2 --requests 60 --out bench/results/routing

Tenants draw passages from their own pools with Zipf popularity (tenants too).
Each policy gets a fresh Serve app (empty pools, no object-store tier, so a chunk
is either in the serving replica's pool or compiled there) and the same trace at
bounded concurrency over HTTP on 127.0.0.1. Reported per policy: chunk hit rate
(chunks found in the serving replica's pool), chunk copies held across replicas
and their KV blocks, TTFT, and load balance (max / mean requests per replica).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
import ray
from tqdm.auto import tqdm

from bench.squad import load_paragraphs

POLICIES = {"round_robin": "router.baselines:RoundRobinRouter", "ray_default": None,
            "chunk_affinity": "router.chunk_router:ChunkAffinityRouter"}


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (k + 1) ** s for k in range(n)]


def build_trace(n: int, tenants: int, pool: int, chunks: int, s: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    paras = load_paragraphs(600)
    rng.shuffle(paras)
    pools = [paras[t * pool:(t + 1) * pool] for t in range(tenants)]
    trace = []
    for i in range(n):
        t = rng.choices(range(tenants), zipf_weights(tenants, s))[0]
        picked: list[int] = []
        while len(picked) < chunks:
            p = rng.choices(range(pool), zipf_weights(pool, s))[0]
            if p not in picked:
                picked.append(p)
        gold = pools[t][picked[0]]
        rng.shuffle(picked)
        trace.append({"tenant": t, "chunks": [pools[t][p].context for p in picked],
                      "prefix": f"You answer questions for tenant {t} from the documents below.\n",
                      "prompt": f"\nQuestion: {rng.choice(gold.questions)[0]}\nAnswer:"})
    return trace


async def replay(base: str, trace: list[dict], concurrency: int, max_tokens: int, budget_s: float) -> list[dict]:
    results: list[dict | None] = [None] * len(trace)
    queue = list(range(len(trace)))
    deadline = time.perf_counter() + budget_s
    bar = tqdm(total=len(trace), leave=False)

    async def worker(http: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() < deadline:
            i = queue.pop(0)
            body = {**{k: trace[i][k] for k in ("chunks", "prefix", "prompt")}, "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            t0, ttft, usage = time.perf_counter(), None, None
            async with http.stream("POST", base + "/v1/completions", json=body) as r:
                replica = r.headers.get("x-mepic-replica")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    msg = json.loads(line[6:])
                    ttft = ttft or time.perf_counter() - t0
                    usage = msg.get("usage") or usage
            results[i] = {"status": r.status_code, "replica": replica, "ttft_s": ttft, "usage": usage}
            bar.update(1)
    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    bar.close()
    return [r for r in results if r is not None]


def run_policy(name: str, router_class: str | None, args, trace, port: int) -> list[dict]:
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    from deployments.app import EngineServer, OpenAIIngress
    opts = {"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": 0.4}}
    if router_class:
        opts["request_router_config"] = RequestRouterConfig(request_router_class=router_class,
                                                            request_routing_stats_period_s=1)
    engine = EngineServer.options(**opts).bind({"mode": "mepic", "block_size": 16, "kv_cache_bytes": args.kv_bytes,
                                                "model": args.model})
    serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.1}).bind(engine, "mepic", args.model),
              name="mepic", route_prefix="/")
    out = asyncio.run(replay(f"http://127.0.0.1:{port}", trace, args.concurrency, args.max_tokens, args.budget_s))
    serve.delete("mepic")
    return out


def summarize(results: list[dict], trace: list[dict], pages_of: dict[str, int]) -> dict:
    ok = [(r, t) for r, t in zip(results, trace) if r["status"] == 200 and r["usage"]]
    m = [r["usage"]["mepic"] for r, _ in ok]
    seen = sum(x["chunks_pool"] + x["chunks_store"] + x["chunks_miss"] for x in m)
    copies = {(r["replica"], c) for r, t in ok for c in t["chunks"]}    # pools are big enough never to evict
    per_replica = Counter(r["replica"] for r, _ in ok)
    ttft = sorted(r["ttft_s"] for r, _ in ok)
    return {"requests": len(ok), "chunk_hit_rate": sum(x["chunks_pool"] for x in m) / max(seen, 1),
            "chunk_copies": len(copies), "chunk_kv_blocks": sum(pages_of[c] for _, c in copies),
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
            "max_over_mean_requests": max(per_replica.values()) / statistics.mean(per_replica.values()),
            "requests_per_replica": sorted(per_replica.values(), reverse=True)}


def oracle_hit_rate(trace: list[dict], replicas: int) -> float:
    """Knows every pool exactly, ignores load: each request goes where most of its chunks are."""
    pools, sent, hits, total = [set() for _ in range(replicas)], [0] * replicas, 0, 0
    for t in trace:
        cs = set(t["chunks"])
        best = max(range(replicas), key=lambda r: (len(cs & pools[r]), -sent[r]))
        hits, total = hits + len(cs & pools[best]), total + len(cs)
        pools[best] |= cs
        sent[best] += 1
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--pool", type=int, default=8, help="passages per tenant")
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--kv-bytes", type=int, default=256 * 2**20)
    ap.add_argument("--budget-s", type=float, default=900)
    ap.add_argument("--out", default="bench/results/routing")
    args = ap.parse_args()
    from ray import serve
    from transformers import AutoTokenizer
    from mepic_ray.worker.model_loader import resolve_model
    args.model = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(args.model)
    trace = build_trace(args.requests, args.tenants, args.pool, args.chunks, args.zipf, seed=0)
    pages_of = {c: max(0, -(-len(tok.encode(c, add_special_tokens=False)) // 16) - 1) for t in trace for c in t["chunks"]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = {}
    for name, cls in tqdm(POLICIES.items(), desc="policies"):
        rows[name] = summarize(run_policy(name, cls, args, trace, port), trace, pages_of)
    serve.shutdown()
    oracle = oracle_hit_rate(trace, args.replicas)
    command = (f"python -m bench.routing --replicas {args.replicas} --requests {args.requests} --tenants {args.tenants} "
               f"--pool {args.pool} --chunks {args.chunks} --zipf {args.zipf} --concurrency {args.concurrency} "
               f"--out {args.out}")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "oracle_hit_rate": oracle, "policies": rows},
                                                   indent=1))
    lines = [f"# Routing policies\n\nCommand: `{command}`\n",
             f"Embedded SmolLM2, {args.replicas} replicas on one 2-core machine, {len(trace)} requests of "
             f"{args.chunks} SQuAD passages from {args.tenants} tenants x {args.pool} passages (Zipf {args.zipf}), "
             f"{args.concurrency} concurrent clients, no object-store tier. Oracle hit rate (knows every pool, "
             f"ignores load): **{oracle:.1%}**.\n",
             "| policy | chunk hit rate | chunk copies | chunk KV blocks | TTFT p50 | TTFT p95 | max/mean requests |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['chunk_hit_rate']:.1%} | {r['chunk_copies']} | {r['chunk_kv_blocks']} | "
                     f"{r['ttft_p50_s']:.2f} s | {r['ttft_p95_s']:.2f} s | {r['max_over_mean_requests']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    names = list(rows)
    for ax, key, title in zip(axes, ("chunk_hit_rate", "chunk_kv_blocks", "ttft_p50_s"),
                              ("chunk hit rate", "chunk KV blocks across replicas", "TTFT p50 (s)")):
        ax.bar(names, [rows[n][key] for n in names], color=["#999", "#69c", "#c63"])
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=15)
    axes[0].axhline(oracle, ls="--", color="k", label="oracle")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
