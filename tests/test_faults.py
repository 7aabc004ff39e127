"""Faults and admission control on the real service (local Ray, HTTP on 127.0.0.1):
replicas killed mid-request and mid-stream, a replacement that gets traffic, the
app redeployed, timeouts and backpressure answered with a reason."""
import json
import os
import signal
import threading
import time

import httpx
import pytest

from helpers import (actor_pid, affinity_router, live_replicas, replica_actor_name, start_local_serve,
                     wait_replicas)

ray = pytest.importorskip("ray")

from mepic_ray import LLM, Chunk, SamplingParams  # noqa: E402

ENGINE = {"mode": "mepic", "block_size": 8, "num_blocks": 4096}
DOCS = ["kappa document about harbours, ships and cargo cranes",
        "lambda document about libraries, books and quiet reading rooms"]



def deploy_main(tiny_model_dir):
    from ray import serve
    from deployments.app import EngineServer, OpenAIIngress
    router = affinity_router()
    engine = EngineServer.options(num_replicas=2, request_router_config=router, ray_actor_options={"num_cpus": 0.4},
                                  health_check_period_s=1, health_check_timeout_s=5).bind({**ENGINE, "model": tiny_model_dir}, {"name": "faults", "load_policy": "always"})
    serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.2}).bind(engine, "mepic", tiny_model_dir),
              name="mepic", route_prefix="/")


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    from ray import serve
    from deployments.app import EngineServer, OpenAIIngress
    url = start_local_serve(4)
    deploy_main(tiny_model_dir)
    # A second, deliberately small app: one replica, one request at a time, one queued,
    # and a one-second budget per non-streamed answer.
    small = EngineServer.options(name="SmallEngine", num_replicas=1, max_ongoing_requests=1, max_queued_requests=1,
                                 ray_actor_options={"num_cpus": 0.3}).bind({**ENGINE, "model": tiny_model_dir})
    serve.run(OpenAIIngress.options(name="SmallIngress", ray_actor_options={"num_cpus": 0.1}).bind(
        small, "mepic", tiny_model_dir, {"request_timeout_s": 1.0, "queue_timeout_s": 30.0, "max_retries": 0}),
        name="small", route_prefix="/small")
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    return LLM(tiny_model_dir, **ENGINE)


def post(url, body, timeout=120):
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


killed: set[str] = set()


def kill_replica(unique_id: str) -> None:
    killed.add(unique_id)
    ray.kill(ray.get_actor(replica_actor_name("mepic", unique_id), namespace="serve"), no_restart=True)


def wait_running(n: int) -> set[str]:
    return wait_replicas("mepic", n, killed)


def expected(offline, docs, prompt, max_tokens):
    return offline.generate([*map(Chunk, docs), prompt], SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))[0].text


@pytest.mark.parametrize("delay_s", [0.0, 1.0], ids=["right-after-send", "mid-decode"])
def test_non_streaming_request_survives_its_replica(service, offline, delay_s):
    wait_running(2)
    body = {"prompt": " Q: ports?", "chunks": DOCS, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    holder = post(service, body).headers["x-mepic-replica"]     # the chunks now live there
    body["max_tokens"] = 600
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", post(service, body)))
    t.start()
    time.sleep(delay_s)
    kill_replica(holder)
    t.join(timeout=180)
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.headers["x-mepic-replica"] != holder
    want = expected(offline, DOCS, " Q: ports?", 600)
    got = r.json()["choices"][0]["text"]
    assert got == want, (len(got), len(want), r.json()["usage"])


def replica_pid(app: str, unique_id: str, deployment: str = "EngineServer") -> int:
    return actor_pid(replica_actor_name(app, unique_id, deployment))


def stream_events(url: str, body: dict, on_event=None, timeout_s: float = 120) -> tuple[str, list[dict | str]]:
    """POST a streaming request; returns the replica header and the parsed events."""
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout_s) as r:
        assert r.status_code == 200, r.read()
        replica = r.headers["x-mepic-replica"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                if on_event is not None:
                    on_event(len(events), replica)
                if events[-1] == "[DONE]":
                    break
    return replica, events


def test_stream_resumes_on_another_replica_after_sigkill(service, offline):
    """The ingress continues a stream cut by its replica's death on another replica,
    with the tokens already sent as a forced prefix: the client's text is the same as
    an uninterrupted run's, nothing repeated, nothing missing."""
    pids = {r: replica_pid("mepic", r) for r in wait_running(2)}
    body = {"prompt": " Q: books?", "chunks": DOCS[::-1], "max_tokens": 600, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    def kill_at_third(n: int, replica: str) -> None:
        if n == 3:
            killed.add(replica)
            os.kill(pids[replica], signal.SIGKILL)

    replica, events = stream_events(service, body, kill_at_third)
    assert replica in killed and events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1]), [e for e in events if "error" in e]
    *tokens, usage = events[:-1]
    text = "".join(e["choices"][0]["text"] for e in tokens)
    assert text == expected(offline, DOCS[::-1], " Q: books?", 600)
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    u = usage["usage"]
    assert u["completion_tokens"] == 600 and 0 < u["mepic"]["resumed_tokens"] < 600, u   # it was really cut


def test_replacement_replica_comes_back_and_gets_traffic(service):
    assert killed, "runs after the tests that kill replicas"
    seen, current = set(), wait_running(2)
    deadline = time.time() + 60
    for i in range(200):   # unrelated traffic spreads over both current replicas, once the router knows them
        r = post(service, {"prompt": f" unrelated {i}", "chunks": [f"fresh document {i} " * 3], "max_tokens": 2})
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-mepic-replica"])
        if seen >= current or time.time() > deadline:
            break
        time.sleep(0.3)
    assert seen == current and not seen & killed, (seen, current, killed)   # replacements or survivors


def test_app_redeployed_comes_up_clean_and_warm(service, tiny_model_dir, offline):
    from ray import serve
    body = {"prompt": " Q: again?", "chunks": DOCS, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    assert post(service, body).status_code == 200
    time.sleep(1.0)      # write-through demotion is asynchronous
    serve.delete("mepic")
    deploy_main(tiny_model_dir)
    wait_running(2)
    deadline = time.time() + 30
    while True:          # give the new replicas' warm-up from the store a moment
        r = post(service, body)
        if r.json()["usage"]["mepic"]["compiled_tokens"] == 0 or time.time() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200
    assert r.json()["usage"]["mepic"]["compiled_tokens"] == 0
    assert r.json()["choices"][0]["text"] == expected(offline, DOCS, " Q: again?", 4)


def test_timeout_answers_504_and_frees_pages(service):
    small = service + "/small"
    r = post(small, {"prompt": "slow one", "max_tokens": 1800, "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    deadline = time.time() + 30
    while True:          # the aborted request's pages go back to the pool
        s = httpx.get(small + "/v1/mepic/stats", timeout=30).json()
        if s["used_blocks"] == 0 and s["running"] == 0 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert s["used_blocks"] == 0 and s["running"] == 0


def test_backpressure_answers_503_with_retry_after(service):
    """One replica, one ongoing and one queued request allowed: of four concurrent
    streams, the extra ones are refused at once with a reason and Retry-After."""
    import asyncio
    small = service + "/small"
    body = {"prompt": "hold", "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def one(http, i):
        await asyncio.sleep(0.2 * i)     # arrive in order
        async with http.stream("POST", small + "/v1/completions", json=body) as r:
            await r.aread()
            return r.status_code, r.headers.get("retry-after"), r.text

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(4)))
    results = asyncio.run(asyncio.wait_for(run(), 180))
    codes = [c for c, _, _ in results]
    assert codes[0] == 200 and codes.count(200) >= 2
    refused = [(ra, text) for c, ra, text in results if c == 503]
    assert refused, codes
    assert all(ra and "overloaded" in text for ra, text in refused)


def test_service_continues_when_the_chunk_store_dies(service, offline):
    from mepic_ray.tier.chunk_store import get_or_create_store
    wait_running(2)
    ray.kill(get_or_create_store("faults", "mepic", 1))
    docs = ["mu document about orchards, apples and autumn", "nu document about deserts, dunes and wind"]
    body = {"prompt": " Q: fruit?", "chunks": docs, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    for _ in range(3):      # compiled, then reused; the store is recreated on next use
        r = post(service, body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected(offline, docs, " Q: fruit?", 4)


def test_client_that_hangs_up_mid_stream_frees_its_request(service):
    """A streaming client that disconnects is aborted on the replica (its pages go back)
    instead of being decoded to max_tokens for nobody."""
    small = service + "/small"
    before = httpx.get(small + "/v1/mepic/stats", timeout=30).json()["aborted"]
    body = {"prompt": "talk", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", small + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.time() + 30
    while True:
        s = httpx.get(small + "/v1/mepic/stats", timeout=30).json()
        if s["running"] == 0 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert s["aborted"] == before + 1, s
    assert s["running"] == 0 and s["used_blocks"] == 0


def test_stream_is_given_up_after_max_retries(service):
    """With ``max_retries: 0`` (the small app) a stream whose replica dies ends with an
    error event and [DONE], not a hang. Last here: it kills the small app's replica."""
    wait_replicas("small", 1, killed, deployment="SmallEngine")
    live = live_replicas("small", 1, killed, deployment="SmallEngine")
    pids = {r: replica_pid("small", r, "SmallEngine") for r in live}
    body = {"prompt": "talk", "max_tokens": 1500, "ignore_eos": True, "stream": True}

    def kill_at_third(n: int, replica: str) -> None:
        if n == 3:
            killed.add(replica)
            os.kill(pids[replica], signal.SIGKILL)

    _, events = stream_events(service + "/small", body, kill_at_third)
    assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
    assert len(events) < 1500
