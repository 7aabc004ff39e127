"""Hostile stop strings against the real service (Ray Serve and HTTP on 127.0.0.1, the
tiny model): one request with a 1 MB stop string and max_tokens 4 used to hold the
engine thread for about a minute, so every other request on the replica waited. Now
such a stop string is refused at once (400 naming ``stop``), and the most and longest
stop strings allowed answer in about the time of a plain request, without delaying a
second client."""
import json
import threading
import time

import httpx
import pytest

from helpers import deploy_one_tiny_replica, start_local_serve
from mepic_ray.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

ray = pytest.importorskip("ray")

PROMPT = "Tell me about stop strings"
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    from ray import serve
    url = start_local_serve(2)
    # One replica, so the hostile request and the second client share an engine thread.
    # The default body limit (8 MiB) lets a 1 MB stop string through to the parser.
    deploy_one_tiny_replica(tiny_model_dir, {"request_timeout_s": 60})
    yield url
    serve.shutdown()
    ray.shutdown()


def post(base, body, path="/v1/completions", timeout=30.0):
    t0 = time.perf_counter()
    r = httpx.post(base + path, content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=timeout)
    return r, time.perf_counter() - t0


def complete(base, **body):
    r, dt = post(base, {"prompt": PROMPT, "max_tokens": 8, **GREEDY, **body})
    assert r.status_code == 200, r.text[:300]
    return r.json()["choices"][0], dt


@pytest.fixture(scope="module")
def baseline(service):
    """A plain request's latency once warm (the best of three), and its greedy text."""
    complete(service)
    times, texts = [], set()
    for _ in range(3):
        choice, dt = complete(service)
        times.append(dt)
        texts.add(choice["text"])
    assert len(texts) == 1
    return min(times), texts.pop()


def bound(base_s: float) -> float:
    """'About normal time': generous, for a shared two-core machine. The old code took
    ~60-90 s for the 1 MB case."""
    return 5 * base_s + 3.0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
# Short ids: pytest puts the test id in PYTEST_CURRENT_TEST, and a megabyte in the
# environment makes every process Ray starts fail with "Argument list too long".
@pytest.mark.parametrize("stop", ["x" * 2**20, ["end", "y" * 2**20]], ids=["one", "in_a_list"])
def test_megabyte_stop_string_is_refused_quickly(service, path, stop):
    body = ({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": PROMPT}]})
    r, dt = post(service, {**body, "max_tokens": 4, "stop": stop}, path=path)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == "stop" and str(MAX_STOP_STRING_CHARS) in err["message"], err
    assert dt < 5.0, dt


def test_too_many_stop_strings_are_refused(service):
    r, _ = post(service, {"prompt": PROMPT, "max_tokens": 4, "stop": ["s"] * (MAX_STOP_STRINGS + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text[:300]


def test_longest_allowed_stop_strings_are_held_back_then_released(service, baseline):
    """Every stop string starts with the whole answer, so each streamed step must hold all
    of the text back (it may still become a stop string) and the last one releases it."""
    base_s, text = baseline
    stops = [(text + chr(0x4E00 + i) * MAX_STOP_STRING_CHARS)[:MAX_STOP_STRING_CHARS] for i in range(MAX_STOP_STRINGS)]
    t0 = time.perf_counter()
    deltas, reasons = [], []
    with httpx.stream("POST", service + "/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 8, **GREEDY, "stop": stops, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["text"])
                reasons.append(choice["finish_reason"])
    dt = time.perf_counter() - t0
    assert "".join(deltas) == text and reasons[-1] == "length"
    assert all(d == "" for d in deltas[:-1]), deltas
    assert dt < bound(base_s), (dt, base_s)


def test_longest_allowed_stop_strings_cut_where_one_matches(service, baseline):
    base_s, text = baseline
    if len(text) < 5:
        pytest.skip(f"the tiny model's answer is too short to cut: {text!r}")
    stop = text[2:5]
    long = [chr(0x4E00 + i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS - 1)]
    choice, dt = complete(service, stop=long + [stop])
    assert choice["finish_reason"] == "stop" and choice["text"] == text[:text.find(stop)], (choice, text)
    assert dt < bound(base_s), (dt, base_s)


def test_a_second_client_is_not_delayed(service, baseline):
    """The most and longest stop strings allowed, one that keeps partly matching all along,
    while a second client sends a plain request to the same replica."""
    base_s, text = baseline
    stops = [(text[:1] + chr(0x4E00 + i) * MAX_STOP_STRING_CHARS)[:MAX_STOP_STRING_CHARS]
             for i in range(MAX_STOP_STRINGS)]
    results = {}

    def hostile():
        results["hostile"] = complete(service, stop=stops)

    for _ in range(2):
        t = threading.Thread(target=hostile)
        t.start()
        time.sleep(0.05)
        choice, small_s = complete(service)
        t.join(60)
        assert not t.is_alive()
        hostile_choice, hostile_s = results.pop("hostile")
        assert hostile_choice["finish_reason"] == "length"
        assert small_s < bound(base_s), (small_s, base_s)
        assert hostile_s < bound(base_s), (hostile_s, base_s)
