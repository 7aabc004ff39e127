"""The shipped deployment on a real multi-node Ray cluster on one machine: a head and
two worker nodes, each a raylet of its own with its own ports and object store
(``ray.cluster_utils.Cluster``), plus a spare worker for the store-loss check. The
app is started with ``serve run`` from ``deployments/mepic.yaml`` (its replicas asked
onto the worker nodes), then:

1. a chunk compiled on one worker is loaded on the other through the object store
   (bytes and time measured by the loading replica);
2. the raylet of the worker holding the busy replica is killed by PID while streams
   run: each stream continues on the other node, and the router sends nothing more
   to the dead one;
3. the replacement replica, on the surviving worker, warms from the store;
4. the store (on the head) keeps serving; a store placed on a worker that dies is
   re-created on the next call, and requests compile meanwhile.

    python -m bench.multinode --out bench/results/multinode

The test ``tests/test_multinode.py`` runs the same steps with a tiny model and checks
every answer against one engine's.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
REPLICA_PREFIX = "SERVE_REPLICA::mepic#{}#"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiNodeApp:
    """The cluster, this process connected to it, and ``serve run`` of the shipped YAML."""

    def __init__(self, workdir: Path, model: str | None, store_name: str, quality_gate: bool = True,
                 load_policy: str | None = None, edit=None):
        """``edit``, if given, changes the YAML (a dict) before ``serve run`` reads it."""
        import ray
        from ray.cluster_utils import Cluster
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        self.workers = [self.cluster.add_node(num_cpus=1, resources={"mepic_worker": 2}) for _ in range(2)]
        self.spare = self.cluster.add_node(num_cpus=1, resources={"spare": 1})
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cfg = yaml.safe_load((REPO / "deployments" / "mepic.yaml").read_text())
        cfg["http_options"]["port"] = port
        args = cfg["applications"][0]["args"]
        if model is not None:
            args["engine"]["model"] = model
        if not quality_gate:
            args["quality_gate"]["on_failure"] = "warn"
        args["chunk_store"]["name"] = self.store_name = store_name
        if load_policy is not None:    # a tiny test model compiles faster than it loads: "cost" never loads
            args["chunk_store"]["load_policy"] = load_policy
        engine = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "EngineServer")
        engine["ray_actor_options"]["resources"] = {"mepic_worker": 1}    # replicas on the worker nodes
        if edit is not None:
            edit(cfg)
        self.config = workdir / "mepic.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = workdir / "serve-run.log"
        self.proc = subprocess.Popen([Path(sys.executable).parent / "serve", "run", str(self.config)], cwd=REPO,
                                     env={**os.environ, "RAY_ADDRESS": self.cluster.address,
                                          "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 600, replicas: int = 2) -> None:
        deadline = time.time() + timeout_s
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            assert time.time() < deadline, self.log.read_text()[-4000:]
            try:
                up = httpx.get(self.url + "/v1/models", timeout=5).status_code == 200
                if up and len(self.replicas()) >= replicas:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)

    def replicas(self, deployment: str = "EngineServer") -> dict[str, str]:
        """Live replica id (of the engine, or of ``deployment``) -> the node it runs on."""
        from ray._private.state import state
        prefix = REPLICA_PREFIX.format(deployment)
        return {v["Name"][len(prefix):]: v["Address"]["NodeID"] for v in state.actor_table(None).values()
                if v["State"] == "ALIVE" and v.get("Name", "").startswith(prefix)}

    def node_of(self, node_id: str):
        return next(n for n in [*self.workers, self.spare] if n.node_id == node_id)

    def kill_raylet(self, node) -> int:
        """SIGKILL the node's raylet by PID, then the worker processes it started (replicas,
        actors): what a node's crash does. Workers left without their raylet would otherwise
        go on answering calls made to them directly for a while."""
        import psutil
        pid = node.all_processes["raylet"][0].process.pid
        children = psutil.Process(pid).children(recursive=True)
        os.kill(pid, signal.SIGKILL)
        for c in children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        return pid

    def stop(self) -> None:
        import ray
        try:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
        ray.shutdown()
        self.cluster.shutdown()


def stream(url: str, body: dict, first_token: threading.Event | None = None) -> dict:
    """A streamed completion: its text, replicas seen (the header), and errors."""
    out = {"text": "", "errors": [], "replica": None, "tokens": 0, "usage": None}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        out["status"], out["replica"] = r.status_code, r.headers.get("x-mepic-replica")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["errors"].append(event["error"])
                continue
            if event.get("usage"):    # the last event: resumed_tokens > 0 if it moved replica
                out["usage"] = event["usage"]
                continue
            out["text"] += event["choices"][0]["text"]
            out["tokens"] += 1
            if first_token is not None and out["tokens"] >= 3:
                first_token.set()
    return out


def complete(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


LOAD_COUNTS = ("loads", "load_bytes", "load_us", "warm_loads", "warm_bytes", "warm_us")


def stats_of(url: str, replica: str, timeout_s: float = 90) -> dict | None:
    """``/v1/mepic/stats`` of one replica: asked until the router picks it (bounded by
    time: how many tries that takes depends on what the router sent each replica)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.get(url + "/v1/mepic/stats", timeout=30)
        if r.status_code == 200 and r.json()["replica"] == replica:
            return r.json()
        time.sleep(0.1)
    return None


def node_loss(app: MultiNodeApp, docs: list[str], questions: list[str], max_tokens: int) -> dict:
    """Steps 1-3: compile on one worker, kill it mid-stream, serve on the other. The
    measurements, the streams' texts and every replica that answered afterwards."""
    base = {"chunks": docs, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    first = complete(app.url, {**base, "prompt": questions[0]})
    holder, before = first.headers["x-mepic-replica"], app.replicas()
    from ray import get, get_actor
    store = get_actor(app.store_name, namespace="mepic")
    deadline = time.monotonic() + 30
    while get(store.stats.remote(), timeout=30)["num_chunks"] < len(docs) and time.monotonic() < deadline:
        time.sleep(0.2)    # write-through demotion is asynchronous
    started = [threading.Event() for _ in questions]
    results: list[dict | None] = [None] * len(questions)

    def run(i: int) -> None:
        results[i] = stream(app.url, {**base, "prompt": questions[i]}, started[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for e in started:
        e.wait(timeout=120)
    dead_node = before[holder]
    t_kill = time.monotonic()
    pid = app.kill_raylet(app.node_of(dead_node))
    for t in threads:
        t.join(timeout=300)
    streams_s = time.monotonic() - t_kill
    after = [complete(app.url, {**base, "prompt": q}) for q in questions]
    survivors = {r.headers["x-mepic-replica"] for r in after}
    # Every chunk the survivors read from the store: loaded for a request, or warmed
    # ahead of one (a replica warms from the store as it starts, and may start after
    # the first compile was demoted).
    loads = {k: 0 for k in LOAD_COUNTS}
    unseen = []                                                      # survivors whose stats never came
    for replica in survivors:
        stats = stats_of(app.url, replica)
        if stats is None:
            unseen.append(replica)
        counts = (stats or {}).get("store") or {}
        for k in loads:
            loads[k] += counts.get(k, 0)
    # The replacement replica (Serve keeps min_replicas) on the surviving worker.
    deadline, fresh = time.monotonic() + 300, set()
    while time.monotonic() < deadline:
        fresh = set(app.replicas()) - set(before)
        if fresh:
            break
        time.sleep(1)
    warm = None
    if fresh:
        (new,) = fresh
        for _ in range(120):
            warm = stats_of(app.url, new)
            if warm and warm["idle_chunk_blocks"] + warm["used_blocks"] > 0:
                break
            time.sleep(1)
    store_stats = get(store.stats.remote(), timeout=30)
    return {"first": first.json(), "holder": holder, "dead_node": dead_node, "raylet_pid": pid,
            "replicas_before": before, "streams": results, "streams_after_kill_s": streams_s,
            "after": [r.json() | {"replica": r.headers.get("x-mepic-replica")} for r in after],
            "survivors": sorted(survivors), "loader_store_counts": loads, "survivors_unseen": unseen,
            "replacement": sorted(fresh), "replacement_node": app.replicas().get(next(iter(fresh)), None) if fresh
            else None, "replacement_stats": warm, "store_after": store_stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    ap.add_argument("--out", default="bench/results/multinode")
    ap.add_argument("--streams", type=int, default=6)
    args = ap.parse_args()
    import tempfile
    from bench.squad import load_paragraphs
    paras = load_paragraphs(600)[:3]
    app = MultiNodeApp(Path(tempfile.mkdtemp(prefix="mn")), args.model, f"multinode_{os.getpid()}")
    try:
        app.wait_ready()
        res = node_loss(app, [p.context for p in paras],
                        [f"\nQuestion {i}: {paras[i % 3].questions[0][0]}\nAnswer:" for i in range(args.streams)], 32)
    finally:
        app.stop()
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    text = report(res, args.out)
    out.with_suffix(".md").write_text(text)
    print(text)


def report(res: dict, out: str) -> str:
    c = res["loader_store_counts"]
    lost = sum(1 for s in res["streams"] if s is None or s["errors"] or s["tokens"] == 0)
    by_new = [a["usage"]["mepic"] for a in res["after"] if a["replica"] in res["replacement"]]
    warm = res["replacement_stats"] and res["replacement_stats"]["idle_chunk_blocks"]
    moved = sum(1 for s in res["streams"] if s and s["usage"] and s["usage"]["mepic"]["resumed_tokens"])
    lines = [f"`python -m bench.multinode --out {out}`", "",
             "Head + 2 worker nodes (+1 spare) on one machine, `serve run deployments/mepic.yaml` with the replicas "
             "on the workers.", "",
             f"- Replicas before: {len(res['replicas_before'])} on {len(set(res['replicas_before'].values()))} nodes.",
             f"- Killed the raylet (PID {res['raylet_pid']}) of the node of replica `{res['holder']}` while "
             f"{len(res['streams'])} streams ran: {moved} resumed on the other node, {lost} lost; all finished "
             f"{res['streams_after_kill_s']:.1f} s "
             "after the kill.",
             f"- Afterwards every request went to {res['survivors']} (not the dead replica).",
             f"- Cross-node reads by the survivors (the store is on the head): {c.get('loads', 0)} chunks loaded "
             f"for requests, {c.get('load_bytes', 0)} bytes in {c.get('load_us', 0) / 1e3:.1f} ms; "
             f"{c.get('warm_loads', 0)} warmed ahead of them, {c.get('warm_bytes', 0)} bytes in "
             f"{c.get('warm_us', 0) / 1e3:.1f} ms.",
             f"- Replacement {res['replacement']} on the surviving worker: {warm} idle chunk blocks; the "
             f"{len(by_new)} requests it served had {sum(u['chunks_pool'] for u in by_new)} chunks in its pool, "
             f"{sum(u['chunks_store'] for u in by_new)} loaded and {sum(u['compiled_tokens'] for u in by_new)} "
             "tokens compiled (it warmed from the store).",
             f"- Store after the loss: {res['store_after']['num_chunks']} chunks, "
             f"{res['store_after']['bytes_used']} bytes."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
