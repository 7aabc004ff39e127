"""Preemption behind the OpenAI routes (Ray Serve and HTTP on 127.0.0.1, the tiny
model): on a pool too small for the streams at once, requests are preempted and
resumed, and every stream still carries exactly the offline engine's answer from a
large pool, each piece once: a preempted stream pauses, never repeats or drops text."""
import json
import threading

import httpx
import pytest

from helpers import deploy_one_tiny_replica, start_local_serve
from mepic_ray import LLM, Chunk, SamplingParams

ray = pytest.importorskip("ray")

DOCS = ["first shared doc, two blocks", "second doc here", "third: short"]
PROMPTS = [(f"Sys. {i} ", [DOCS[0], DOCS[1]], f" Q{i}?") if i % 2 else (f"S {i} ", [DOCS[2], DOCS[0]], f" q{i}")
           for i in range(6)]
MAX_TOKENS = 48
ENGINE = {"num_blocks": 24, "max_num_batched_tokens": 32, "max_num_seqs": 8}


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    from ray import serve
    url = start_local_serve(2)
    deploy_one_tiny_replica(tiny_model_dir, {"request_timeout_s": 120}, **ENGINE)
    yield url
    serve.shutdown()
    ray.shutdown()


def offline_answers(model_dir):
    llm = LLM(model_dir, mode="mepic", block_size=8, num_blocks=512, max_model_len=256)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [o.text for o in llm.generate([[pre, *map(Chunk, docs), post] for pre, docs, post in PROMPTS], params)]


def stream(base, prompt, out, i):
    pre, docs, post = prompt
    body = {"prefix": pre, "chunks": docs, "prompt": post, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}
    pieces, finish = [], None
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"])
            finish = choice.get("finish_reason") or finish
    out[i] = ("".join(pieces), finish)


def test_preempted_streams_carry_the_large_pool_answers(service, tiny_model_dir):
    want = offline_answers(tiny_model_dir)
    before = httpx.get(service + "/v1/mepic/stats", timeout=30).json()["preemptions"]
    out = {}
    threads = [threading.Thread(target=stream, args=(service, p, out, i)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    stats = httpx.get(service + "/v1/mepic/stats", timeout=30).json()
    assert stats["preemptions"] > before, "a 24-page pool with six growing streams must preempt"
    assert [out[i] for i in range(len(PROMPTS))] == [(w, "length") for w in want]
    assert stats["running"] == stats["waiting"] == 0 and stats["used_blocks"] == 0
