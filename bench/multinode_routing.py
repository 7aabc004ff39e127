"""The router's fixes on the real multi-node cluster (``bench/multinode.py``'s head and
two worker nodes, ``serve run`` of the shipped YAML): the same bounded RAG trace is
sent through Serve twice, once with the rules as first shipped (``RankerConfig.legacy()``
in ``request_router_kwargs``) and once with the YAML's, each on a fresh cluster with
several engine replicas spread over the workers and several ingress replicas (each its
own router, its own memory).

Per run: the chunk hit rate the replicas report (chunks found in the serving replica's
pool), chunks loaded from the store and compiled, requests served per replica
(max/mean), TTFT, and from Ray's metrics on every node the router's decision time
inside Serve's event loop (``mepic_router_decision_seconds``, waits for queue probes
excluded) and its probes per request.

    python -m bench.multinode_routing --out bench/results/multinode_routing
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import threading
import time
from dataclasses import fields
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.multinode import REPO, MultiNodeApp
from router.ranker_config import RankerConfig

DECISION = "ray_mepic_router_decision_seconds"


def legacy_kwargs() -> dict:
    cfg = RankerConfig.legacy()
    return {f.name: getattr(cfg, f.name) for f in fields(RankerConfig)}


def yaml_kwargs() -> dict:
    import yaml
    spec = yaml.safe_load((REPO / "deployments" / "mepic.yaml").read_text())
    (engine,) = [d for d in spec["applications"][0]["deployments"] if d["name"] == "EngineServer"]
    return dict(engine["request_router_config"]["request_router_kwargs"])


def out_json(args) -> Path:
    return Path(args.out).with_suffix(".json")


def trace(docs: list[str], questions: list[str], n: int, per_request: int, seed: int) -> list[dict]:
    """``n`` requests of ``per_request`` distinct documents in random order, Zipf (1.1)
    popularity over ``docs``, each with a question."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** 1.1 for i in range(len(docs))]
    out = []
    for i in range(n):
        picked: list[int] = []
        while len(picked) < per_request:
            d = rng.choices(range(len(docs)), weights)[0]
            if d not in picked:
                picked.append(d)
        out.append({"chunks": [docs[d] for d in picked], "prompt": f"\nQuestion: {questions[i % len(questions)]}\nAnswer:",
                    "max_tokens": 4, "temperature": 0})
    return out


def send_all(url: str, bodies: list[dict], concurrency: int, budget_s: float) -> list[dict]:
    """Every body once, ``concurrency`` at a time, none started after ``budget_s``."""
    results: list[dict | None] = [None] * len(bodies)
    nxt, lock, deadline = [0], threading.Lock(), time.monotonic() + budget_s
    bar = tqdm(total=len(bodies), desc="requests", leave=False)

    def worker() -> None:
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(bodies) or time.monotonic() > deadline:
                return
            t0 = time.monotonic()
            r = httpx.post(url + "/v1/completions", json=bodies[i], timeout=300)
            results[i] = {"status": r.status_code, "replica": r.headers.get("x-mepic-replica"),
                          "seconds": time.monotonic() - t0,
                          "mepic": r.json()["usage"]["mepic"] if r.status_code == 200 else None}
            bar.update()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    return [r for r in results if r is not None]


def scrape(min_decisions: int, timeout_s: float = 90) -> dict:
    """The router's histogram buckets and counters summed over every node's metrics
    endpoint, once they count at least ``min_decisions`` decisions."""
    import ray
    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    deadline, got = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        got = {"buckets": {}, "count": 0.0, "sum": 0.0, "probes": 0.0, "decisions": {}}
        for port in ports:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            except httpx.HTTPError:
                continue
            for line in text.splitlines():
                m = re.match(r'(\w+)(?:\{(.*)\})? ([0-9.e+-]+|\+Inf)$', line)
                if not m:
                    continue
                name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
                if name == DECISION + "_bucket":
                    le = float(re.search(r'le="([^"]+)"', labels).group(1))
                    got["buckets"][le] = got["buckets"].get(le, 0.0) + value
                elif name == DECISION + "_count":
                    got["count"] += value
                elif name == DECISION + "_sum":
                    got["sum"] += value
                elif name == "ray_mepic_router_probes_total":
                    got["probes"] += value
                elif name == "ray_mepic_router_decisions_total":
                    kind = re.search(r'decision="([^"]+)"', labels).group(1)
                    got["decisions"][kind] = got["decisions"].get(kind, 0.0) + value
        if got["count"] >= min_decisions:
            break
        time.sleep(3)
    return got


def quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus's ``histogram_quantile``: linear within the bucket that holds it."""
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    rank, lo, below = q * total, 0.0, 0.0
    for le in edges:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (rank - below) / max(buckets[le] - below, 1e-12)
        lo, below = le, buckets[le]
    return lo


def run_policy(name: str, kwargs: dict | None, args, bodies: list[dict]) -> dict:
    def edit(cfg: dict) -> None:
        deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
        engine = deps["EngineServer"]
        engine["autoscaling_config"] = {"min_replicas": args.replicas, "initial_replicas": args.replicas,
                                        "max_replicas": args.replicas}
        if kwargs is not None:
            engine["request_router_config"]["request_router_kwargs"] = kwargs
        deps["OpenAIIngress"]["num_replicas"] = args.ingresses
    app = MultiNodeApp(Path(tempfile.mkdtemp(prefix="mnr")), args.model, f"mnr_{name}_{int(time.time())}",
                       quality_gate=False, edit=edit)
    try:
        app.wait_ready(replicas=args.replicas)
        placed = app.replicas()
        t0 = time.monotonic()
        results = send_all(app.url, bodies, args.concurrency, args.budget_s)
        wall = time.monotonic() - t0
        metrics = scrape(len(results))
    finally:
        app.stop()
    ok = [r for r in results if r["status"] == 200]
    pool = sum(r["mepic"]["chunks_pool"] for r in ok)
    store = sum(r["mepic"]["chunks_store"] for r in ok)
    miss = sum(r["mepic"]["chunks_miss"] for r in ok)
    served = [sum(1 for r in ok if r["replica"] == rid) for rid in placed]
    # Time-averaged ongoing requests per replica, as the client saw them (the simulator's
    # "load"): a replica whose requests hit finishes more of them at the same queue length.
    busy = [sum(r["seconds"] for r in ok if r["replica"] == rid) / wall for rid in placed]
    return {"policy": name, "router_kwargs": kwargs, "replicas": placed, "requests": len(results), "ok": len(ok),
            "wall_s": wall, "hit_rate": pool / max(pool + store + miss, 1), "chunks_pool": pool,
            "chunks_store": store, "chunks_miss": miss, "served": served,
            "served_max_over_mean": max(served) / (sum(served) / len(served)) if sum(served) else None,
            "load": busy, "load_max_over_mean": max(busy) / (sum(busy) / len(busy)) if sum(busy) else None,
            "latency_p50_s": statistics.median(r["seconds"] for r in ok) if ok else None,
            "decision_p50_ms": 1e3 * quantile(metrics["buckets"], 0.5) if metrics["buckets"] else None,
            "decision_p99_ms": 1e3 * quantile(metrics["buckets"], 0.99) if metrics["buckets"] else None,
            "decision_mean_ms": 1e3 * metrics["sum"] / metrics["count"] if metrics["count"] else None,
            "probes_per_decision": metrics["probes"] / metrics["count"] if metrics["count"] else None,
            "decisions": metrics["decisions"], "results": results}


def report(runs: list[dict], cmd: str) -> str:
    lines = [f"`{cmd}`", "",
             "Head + 2 worker nodes on one machine, `serve run deployments/mepic.yaml`; the same trace through "
             "Serve with the router's first-shipped rules and with the YAML's. Hit rate: chunks found in the "
             "serving replica's pool (`usage.mepic`). Decision time: `mepic_router_decision_seconds` from every "
             "node's metrics endpoint (inside Serve's event loop, probe waits excluded; p50/p99 interpolated in "
             "its buckets; it includes the ingress's own calls to the engine). Load: time-averaged ongoing "
             "requests per replica as the client saw them.", "",
             "| rules | requests ok | hit rate | from store | compiled | load max/mean | served max/mean | "
             "latency p50 | decision p50 / p99 / mean | probes per request | decisions |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")
        lines.append(f"| {r['policy']} | {r['ok']}/{r['requests']} | {r['hit_rate']:.3f} | {r['chunks_store']} | "
                     f"{r['chunks_miss']} | {fmt(r['load_max_over_mean'])} | {fmt(r['served_max_over_mean'])} | {fmt(r['latency_p50_s'])} s | "
                     f"{fmt(r['decision_p50_ms'])} / {fmt(r['decision_p99_ms'])} / {fmt(r['decision_mean_ms'])} ms | "
                     f"{fmt(r['probes_per_decision'])} | "
                     + ", ".join(f"{k} {int(v)}" for k, v in sorted(r["decisions"].items())) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--out", default="bench/results/multinode_routing")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--ingresses", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=900, help="no request starts after this, per run")
    ap.add_argument("--extra", action="append", default=[],
                    help="another run: the YAML's router options with these changed, e.g. max_load_ratio=1.5")
    ap.add_argument("--only-extra", action="store_true", help="run only the --extra ones, keeping earlier runs")
    args = ap.parse_args()
    from bench.squad import load_paragraphs
    paras = load_paragraphs(500)[:args.docs]
    bodies = trace([p.context for p in paras], [p.questions[0][0] for p in paras], args.requests, 3, seed=0)
    runs = [] if args.only_extra else [run_policy("first shipped", legacy_kwargs(), args, bodies),
                                       run_policy("YAML", None, args, bodies)]
    for extra in args.extra:
        over = {k: float(v) if "." in v else int(v) if v.isdigit() else v
                for k, v in (kv.split("=", 1) for kv in extra.split(","))}
        runs.append(run_policy(f"YAML, {extra}", {**yaml_kwargs(), **over}, args, bodies))
    if args.only_extra and out_json(args).exists():      # beside the runs made before
        runs = [r for r in json.loads(out_json(args).read_text()) if r["policy"] not in {x["policy"] for x in runs}] + runs
    out = Path(args.out)
    out_json(args).write_text(json.dumps(runs, indent=1))
    cmd = "python -m bench.multinode_routing " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v not in (None, False, []) and k not in ("model", "extra", "only_extra"))
    cmd += "".join(f" --extra {e}" for e in args.extra)
    text = report(runs, cmd)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
