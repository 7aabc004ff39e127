"""What registering documents ahead of traffic buys the first request that uses them:
time to first token and the prompt tokens compiled, for the same request shape under
four conditions, on the Serve app (two replicas of the embedded SmolLM2 over the
object-store tier, chunk-affinity routing), over HTTP on 127.0.0.1.

    python -m bench.documents --trials 8 --passages 4 --out bench/results/documents

- ``cold``: the passages sent inline, never seen before (each is compiled);
- ``registered``: registered with ``POST /v1/chunks`` (no warm), then named by id;
- ``registered_warm``: registered with ``"warm": true``, named by id once every
  replica holds them;
- ``warm_hit``: the ``cold`` passages again, in the reverse order (their chunks are in a
  pool now; the order keeps it from being a whole-prompt prefix hit).

Every condition gets fresh SQuAD passages, so none reuses another's chunks; trials
run one request at a time so the TTFTs are not queueing.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from bench.squad import load_paragraphs

CONDITIONS = ("cold", "registered", "registered_warm", "warm_hit")


def ttft(base: str, chunks: list, question: str) -> dict:
    """One streamed chat request: seconds to its first token, and its usage."""
    body = {"messages": [{"role": "user", "content": f"Question: {question}\nAnswer briefly."}], "chunks": chunks,
            "max_tokens": 8, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0, first, usage = time.perf_counter(), None, None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and first is None:
                first = time.perf_counter() - t0
            if event.get("usage"):
                usage = event["usage"]
    return {"ttft_s": first, "cached": usage["prompt_tokens_details"]["cached_tokens"],
            "compiled": usage["mepic"]["compiled_tokens"], "loaded": usage["mepic"]["loaded_tokens"],
            "pool": usage["mepic"]["chunks_pool"], "store": usage["mepic"]["chunks_store"],
            "prompt_tokens": usage["prompt_tokens"]}


def register(base: str, docs: list[dict], warm: bool, timeout_s: float = 120) -> float:
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/chunks", json={"documents": docs, "warm": warm}, timeout=timeout_s)
    r.raise_for_status()
    seconds = time.perf_counter() - t0
    deadline = time.monotonic() + timeout_s
    while warm and time.monotonic() < deadline:     # until every replica holds them
        if all(httpx.get(f"{base}/v1/chunks/{d['id']}").json()["warm_replicas"] >= 2 for d in docs):
            break
        time.sleep(0.2)
    return seconds


def run(base: str, trials: int, passages: int) -> list[dict]:
    paras = load_paragraphs(700)
    rows, k = [], 0
    for trial in tqdm(range(trials), desc="trials"):
        picked = {}
        for cond in ("cold", "registered", "registered_warm"):
            picked[cond] = paras[k:k + passages]
            k += passages
        question = picked["cold"][0].questions[0][0]
        rows.append({"trial": trial, "condition": "cold",
                     **ttft(base, [p.context for p in picked["cold"]], question)})
        for cond, warm in (("registered", False), ("registered_warm", True)):
            docs = [{"text": p.context, "id": f"t{trial}-{cond}-{i}"} for i, p in enumerate(picked[cond])]
            seconds = register(base, docs, warm)
            rows.append({"trial": trial, "condition": cond, "register_s": seconds,
                         **ttft(base, [{"id": d["id"]} for d in docs], picked[cond][0].questions[0][0])})
        # Its chunks in a pool, but not the same prompt again (which would be a whole-prefix
        # hit): the other order, so no recomputed block is found in the prefix cache either.
        rows.append({"trial": trial, "condition": "warm_hit",
                     **ttft(base, [p.context for p in reversed(picked["cold"])], question)})
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for cond in CONDITIONS:
        rs = [r for r in rows if r["condition"] == cond]
        out[cond] = {"n": len(rs), "ttft_p50_s": statistics.median(r["ttft_s"] for r in rs),
                     "ttft_mean_s": statistics.fmean(r["ttft_s"] for r in rs),
                     "compiled_mean": statistics.fmean(r["compiled"] for r in rs),
                     "cached_mean": statistics.fmean(r["cached"] for r in rs),
                     "loaded_mean": statistics.fmean(r["loaded"] for r in rs),
                     "pool_hits": sum(r["pool"] for r in rs), "store_hits": sum(r["store"] for r in rs),
                     "register_s_mean": statistics.fmean(r["register_s"] for r in rs) if "register_s" in rs[0]
                     else None}
    return out


def report(summary: dict, args) -> str:
    hit = summary["warm_hit"]["ttft_p50_s"]
    lines = [f"`python -m bench.documents --trials {args.trials} --passages {args.passages} --out {args.out}`", "",
             f"{args.passages} SQuAD passages per request, chat route, 2 replicas of SmolLM2-135M on CPU, "
             "one request at a time; token figures are means per request.", "",
             "| condition | TTFT p50 (s) | × warm hit | cached tokens | compiled tokens | loaded tokens | "
             "chunks from pool / store | registration (s) |", "|---|---|---|---|---|---|---|---|"]
    for cond in CONDITIONS:
        s = summary[cond]
        reg = f"{s['register_s_mean']:.2f}" if s["register_s_mean"] is not None else ""
        lines.append(f"| {cond} | {s['ttft_p50_s']:.3f} | {s['ttft_p50_s'] / hit:.2f} | {s['cached_mean']:.0f} | "
                     f"{s['compiled_mean']:.0f} | "
                     f"{s['loaded_mean']:.0f} | {s['pool_hits']} / {s['store_hits']} | {reg} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--out", default="bench/results/documents")
    args = ap.parse_args()
    import ray
    from ray import serve
    from deployments.app import EngineServer, OpenAIIngress
    from ray.serve.config import RequestRouterConfig
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store = {"name": f"bench_documents_{port}", "warm_poll_s": 0.5}
    engine = EngineServer.options(num_replicas=2, ray_actor_options={"num_cpus": 0.4}, request_router_config=
                                  RequestRouterConfig(request_router_class="router.chunk_router:ChunkAffinityRouter",
                                                      request_routing_stats_period_s=1)).bind(
        {"mode": "mepic", "block_size": 16, "kv_cache_bytes": 1 << 30, "model": args.model}, store, None)
    serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.1}).bind(engine, "mepic", args.model),
              name="mepic", route_prefix="/")
    try:
        rows = run(f"http://127.0.0.1:{port}", args.trials, args.passages)
    finally:
        serve.shutdown()
        ray.kill(ray.get_actor(store["name"], namespace="mepic"))
        ray.shutdown()
    summary = summarize(rows)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    text = report(summary, args)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
