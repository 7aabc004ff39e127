"""Cache-aware scale-down on the real service (local Ray, Serve, HTTP on 127.0.0.1,
the tiny model): a replica that Serve stops first demotes the chunks only its pool
holds, so the replica that stays serves them from the store instead of compiling
them again. The tier writes nothing through here: without the demotion on stop,
the stopped replica's chunks would exist nowhere.

Reference: each answer is compared with the same request's answer before the
scale-down (greedy, so a chunk loaded from the store must give the same tokens)."""
import time
import uuid

import httpx
import pytest

from helpers import affinity_router, start_local_serve

ray = pytest.importorskip("ray")

GREEDY = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}


def deploy(model_dir: str, store: dict) -> None:
    """Two replicas that the autoscaler takes down to one once traffic has been low for
    ``downscale_delay_s``: Serve's own scale-down, with its graceful shutdown."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig
    from deployments.app import EngineServer, OpenAIIngress
    scaling = AutoscalingConfig(min_replicas=1, initial_replicas=2, max_replicas=2, target_ongoing_requests=100,
                                metrics_interval_s=0.5, look_back_period_s=2, downscale_delay_s=30)
    engine = EngineServer.options(autoscaling_config=scaling, ray_actor_options={"num_cpus": 0.5},
                                  request_router_config=affinity_router()).bind(
        {"mode": "mepic", "block_size": 8, "num_blocks": 512, "max_model_len": 256, "model": model_dir}, store, None)
    serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.2}).bind(
        engine, "mepic", model_dir, {"request_timeout_s": 60}), name="mepic", route_prefix="/")


def ask(base: str, docs: list[str]) -> httpx.Response:
    r = httpx.post(base + "/v1/completions", json={"prompt": "\nQ: which?\nA:", "chunks": docs, **GREEDY}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    return r


def live_replicas() -> set[str]:
    from ray._private.state import state
    return {v["Name"].rsplit("#", 1)[-1] for v in state.actor_table(None).values()
            if v["State"] == "ALIVE" and v.get("Name", "").startswith("SERVE_REPLICA::mepic#EngineServer#")}


def test_a_stopped_replica_leaves_its_chunks_in_the_store(tiny_model_dir):
    from ray import serve
    base = start_local_serve(2)
    store = {"name": f"scale-{uuid.uuid4().hex[:8]}", "write_through": False, "load_policy": "always",
             "warm_fraction": 0.0}
    try:
        deploy(tiny_model_dir, store)
        served: dict[str, list] = {}    # replica -> (docs, answer) it compiled
        for i in range(12):             # unrelated chunks: the router spreads them over both replicas
            docs = [f"document {i} about the harbour number {i}, its cranes and its ships " * 2]
            r = ask(base, docs)
            assert r.json()["usage"]["mepic"]["compiled_tokens"] > 0
            served.setdefault(r.headers["x-mepic-replica"], []).append((docs, r.json()["choices"][0]["text"]))
        assert len(served) == 2
        before = live_replicas()
        assert len(before) == 2, "the autoscaler scaled down before the chunks were spread: raise downscale_delay_s"
        deadline = time.monotonic() + 120           # until the autoscaler stops one, gracefully
        while len(live_replicas()) != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        (kept,) = live_replicas()
        (stopped,) = before - {kept}
        for docs, answer in served[stopped]:
            r = ask(base, docs)
            u = r.json()["usage"]["mepic"]
            assert r.headers["x-mepic-replica"] == kept
            assert u["compiled_tokens"] == 0 and u["chunks_store"] == 1, u      # loaded, not compiled
            assert r.json()["choices"][0]["text"] == answer
    finally:
        try:            # the store actor exists only if the deployment got far enough
            serve.shutdown()
            ray.kill(ray.get_actor(store["name"], namespace="mepic"))
        except ValueError:
            pass
        finally:
            ray.shutdown()
