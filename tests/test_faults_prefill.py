"""A replica killed by PID (SIGKILL, as the OOM killer would) while it prefills a long
prompt of the embedded SmolLM2: the request, streamed or not, runs again on the other
replica and answers exactly what a single engine answers for it."""
import json
import os
import random
import signal
import threading
import time

import httpx
import pytest

from helpers import affinity_router, live_replicas, replica_actor_name, start_local_serve, wait_replicas

ray = pytest.importorskip("ray")

from mepic_ray import LLM, Chunk, SamplingParams  # noqa: E402

ENGINE = {"mode": "mepic", "block_size": 16, "num_blocks": 512}
WORDS = ("harbour crane ledger river valley engine copper market treaty signal winter orchard "
         "granite lantern archive beacon meadow canal furnace glacier").split()
killed: set[str] = set()


def long_document(seed: int, words: int = 1100) -> str:
    """About 1,500 tokens: seconds of prefill on a CPU, so a kill lands inside it."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


@pytest.fixture(scope="module")
def service(smollm2_dir):
    from ray import serve
    from deployments.app import EngineServer, OpenAIIngress
    url = start_local_serve(4)
    router = affinity_router()
    engine = EngineServer.options(num_replicas=2, request_router_config=router, ray_actor_options={"num_cpus": 0.4},
                                  health_check_period_s=1, health_check_timeout_s=5).bind(
        {**ENGINE, "model": smollm2_dir}, {"name": "faults_prefill", "load_policy": "always"})
    serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.2}).bind(
        engine, "mepic", smollm2_dir, {"max_retries": 3}), name="prefill", route_prefix="/")
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def offline(smollm2_dir):
    return LLM(smollm2_dir, **ENGINE)


def kill_when_prefilling(replicas: set[str], timeout_s: float = 60) -> str:
    """SIGKILL the replica whose engine is inside a forward pass with a prefill in it."""
    actors = {r: ray.get_actor(replica_actor_name("prefill", r), namespace="serve") for r in replicas}
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for rid, actor in actors.items():
            # The hook Serve's controller polls for routing stats; it answers while the
            # engine thread computes.
            if ray.get(actor.record_routing_stats.remote(), timeout=10)["prefilling"]:
                pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
                killed.add(rid)
                os.kill(pid, signal.SIGKILL)
                return rid
        time.sleep(0.02)
    raise AssertionError("no replica was seen prefilling")


def read_stream(response) -> tuple[str, list[dict]]:
    text, events = "", []
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        events.append(event)
        text += "".join(c["text"] for c in event.get("choices", []))
    return text, events


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_request_survives_its_replica_killed_mid_prefill(service, offline, stream):
    replicas = wait_replicas("prefill", 2, killed)
    doc = long_document(seed=int(stream))
    body = {"prompt": " Which word comes first?", "chunks": ["A short note on harbours.", doc],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": stream}
    result: dict = {}

    def send():
        with httpx.stream("POST", service + "/v1/completions", json=body, timeout=300) as r:
            result["headers_at"] = time.time()   # sent only once the first token exists
            result["status"], result["replica"] = r.status_code, r.headers.get("x-mepic-replica")
            if stream:
                result["text"], result["events"] = read_stream(r)
            else:
                r.read()
                result["json"] = r.json()
    client = threading.Thread(target=send)
    client.start()
    victim = kill_when_prefilling(replicas)
    killed_at = time.time()
    client.join(timeout=300)
    assert not client.is_alive()
    assert result["headers_at"] > killed_at, "the kill landed after the first token"
    assert result["status"] == 200, result
    assert result["replica"] != victim and result["replica"] in replicas
    if stream:
        assert not any("error" in e for e in result["events"]), result["events"]
        text = result["text"]
    else:
        text = result["json"]["choices"][0]["text"]
    want = offline.generate([Chunk("A short note on harbours."), Chunk(doc), " Which word comes first?"],
                            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].text
    assert text == want
    # The replacement comes up and the service is whole again.
    assert len(wait_replicas("prefill", 2, killed)) == 2
    assert not live_replicas("prefill", 2, killed) & killed
