"""Bounded load generator for the service on 127.0.0.1: rising concurrency until
requests queue, then stop. Every level is bounded in requests and seconds.

    python -m bench.load --url http://127.0.0.1:8000 --levels 1,2,4,8,16,32 --per-level 24

Each request is a short completion with two of a small set of documents as
chunks (so the chunk cache is in play). Reports, per concurrency level:
requests/s, TTFT and latency percentiles, and every status code seen.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter

import httpx

DOCS = [f"Document {i}: " + " ".join(f"fact {i}.{j} is recorded here" for j in range(12)) for i in range(8)]


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    rng = random.Random(i)
    body = {"prompt": f" Question {i}: which facts?", "chunks": rng.sample(DOCS, 2), "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                        "latency": time.perf_counter() - t0}
            error = None
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ttft = ttft or time.perf_counter() - t0
                    if "error" in json.loads(line[6:]):
                        error = "stream_error"
            return {"status": error or 200, "ttft": ttft, "latency": time.perf_counter() - t0}
    except httpx.HTTPError as e:
        return {"status": type(e).__name__, "latency": time.perf_counter() - t0}


async def level(url: str, concurrency: int, n: int, max_tokens: int, budget_s: float, timeout_s: float) -> dict:
    results, started = [], 0
    deadline = time.perf_counter() + budget_s
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        async def worker() -> None:
            nonlocal started
            while started < n and time.perf_counter() < deadline:
                started += 1
                results.append(await one(client, url, started, max_tokens))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttfts = sorted(r["ttft"] for r in ok if r.get("ttft") is not None)
    lat = sorted(r["latency"] for r in ok)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
    return {"concurrency": concurrency, "sent": len(results), "ok": len(ok), "wall_s": wall,
            "rps": len(ok) / wall, "ttft_p50_s": q(ttfts, 0.5), "ttft_p95_s": q(ttfts, 0.95),
            "latency_p50_s": statistics.median(lat) if lat else None, "latency_p95_s": q(lat, 0.95),
            "statuses": dict(Counter(str(r["status"]) for r in results)),
            "retry_after_present": all(r.get("retry_after") for r in results if r["status"] in (429, 503))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--levels", default="1,2,4,8,16,32")
    ap.add_argument("--per-level", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--level-budget-s", type=float, default=120.0)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("the load generator talks to 127.0.0.1 only")
    rows = []
    for c in (int(x) for x in args.levels.split(",")):
        row = asyncio.run(level(args.url, c, args.per_level, args.max_tokens, args.level_budget_s, args.timeout_s))
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
