"""Autoscaling for real: one engine replica under a flood of long streams makes Serve
start a second; the new replica receives traffic and serves the flood's chunks
without compiling them (it loads them from the object-store tier)."""
import time

import httpx
import pytest

from helpers import affinity_router, start_local_serve

ray = pytest.importorskip("ray")

DOCS = ["zeta document about volcanoes, lava and ash clouds",
        "eta document about glaciers, ice and slow rivers of snow"]



@pytest.fixture(scope="module")
def autoscaled(tiny_model_dir):
    from ray import serve
    from ray.serve.config import AutoscalingConfig
    from deployments.app import EngineServer, OpenAIIngress
    url = start_local_serve(2)
    router = affinity_router()
    scaling = AutoscalingConfig(min_replicas=1, initial_replicas=1, max_replicas=2, target_ongoing_requests=1,
                                metrics_interval_s=0.5, look_back_period_s=2, upscale_delay_s=1,
                                downscale_delay_s=600)
    engine = EngineServer.options(autoscaling_config=scaling, request_router_config=router,
                                  ray_actor_options={"num_cpus": 0.4}).bind(
        {"mode": "mepic", "block_size": 8, "num_blocks": 4096, "model": tiny_model_dir},
        {"name": "autoscale_store", "load_policy": "always"})
    serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.2}).bind(engine, "mepic", tiny_model_dir),
              name="mepic", route_prefix="/")
    yield url
    serve.shutdown()
    ray.shutdown()


def running_replicas() -> int:
    from ray import serve
    states = serve.status().applications["mepic"].deployments["EngineServer"].replica_states
    return states.get("RUNNING", 0)


def test_new_replica_starts_under_load_and_receives_traffic(autoscaled):
    body = {"prompt": " Q: which?", "chunks": DOCS, "max_tokens": 2, "temperature": 0}
    first = httpx.post(autoscaled + "/v1/completions", json=body, timeout=60)
    assert first.status_code == 200 and running_replicas() == 1
    original = first.headers["x-mepic-replica"]
    served_by = {}
    with httpx.Client(timeout=120) as http:
        streams = []
        try:
            for i in range(6):    # long streams held open: ongoing requests far above the target of 1
                flood = {**body, "prompt": f" flood {i}", "max_tokens": 1500, "ignore_eos": True, "stream": True}
                cm = http.stream("POST", autoscaled + "/v1/completions", json=flood)
                streams.append(cm)
                cm.__enter__()
            deadline = time.time() + 120
            while running_replicas() < 2 and time.time() < deadline:
                time.sleep(1)
            assert running_replicas() == 2, "Serve did not scale up under load"
            for i in range(12):   # bounded: the router sends new work to the idle new replica
                r = http.post(autoscaled + "/v1/completions", json={**body, "prompt": f" probe {i}"})
                assert r.status_code == 200
                served_by[r.headers["x-mepic-replica"]] = r.json()["usage"]["mepic"]
                if len(served_by) == 2:
                    break
                time.sleep(0.5)
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)
    new = [rid for rid in served_by if rid != original]
    assert new, f"the new replica got no traffic: {served_by}"
    assert served_by[new[0]]["compiled_tokens"] == 0     # warmed from, or loaded from, the store
