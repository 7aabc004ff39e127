"""The shipped deployment file through the `serve run` CLI on a Ray cluster (tiny model,
loopback port): stopped with Ctrl-C and run again, the app comes up clean, answers
exactly as one engine does, and starts warm from the chunk store the first run filled
(the store actor is detached, so it outlives the app)."""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port, shipped_config

pytest.importorskip("ray")

from mepic_ray import LLM, Chunk, SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = ["mu document about bridges, rivets and suspension cables",
        "nu document about orchards, ladders and apple presses"]
QUESTION = " Q: what holds a bridge up?"
# The cluster and its clients share a fresh token: Ray enables token auth on `ray start`
# when the user has one on disk, but never for a client given an explicit address.
CLUSTER_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster in its own session and temp dir (short: Ray's sockets live
    there), killed as a process group at the end, so no other Ray instance is touched."""
    temp = tempfile.mkdtemp(prefix="mr")
    port = free_port()
    env = {**os.environ, **CLUSTER_AUTH,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(Path(temp) / "ray-start.log", "w")
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", "--port", str(port),
                             "--num-cpus", "4", "--include-dashboard=false",
                             "--disable-usage-stats", "--temp-dir", temp],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while "Ray runtime started" not in (Path(temp) / "ray-start.log").read_text():
        assert head.poll() is None and time.time() < deadline, (Path(temp) / "ray-start.log").read_text()
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir):
    """deployments/mepic.yaml as shipped, but with the tiny model, a free port and its own store."""
    path = tmp_path_factory.mktemp("cli") / "mepic.yaml"
    return path, shipped_config(path, tiny_model_dir, "cli_store")


class ServeRun:
    """`serve run CONFIG` as a user runs it, stopped with Ctrl-C."""

    def __init__(self, config: Path, address: str, url: str):
        self.url, self.log = url, config.with_suffix(f".{time.time_ns()}.log")
        self.proc = subprocess.Popen([BIN / "serve", "run", str(config)], cwd=REPO,
                                     env={**os.environ, **CLUSTER_AUTH, "RAY_ADDRESS": address},
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 240) -> None:
        deadline = time.time() + timeout_s
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            assert time.time() < deadline, self.log.read_text()[-4000:]
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)

    def interrupt(self, timeout_s: float = 120) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("serve run did not stop on Ctrl-C:\n" + self.log.read_text()[-4000:])


def ask(url: str) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "prompt": QUESTION, "chunks": DOCS, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_serve_run_restarts_clean_and_warm(cluster, config, tiny_model_dir):
    path, url = config
    offline = LLM(tiny_model_dir, mode="mepic", block_size=16, num_blocks=256)
    want = offline.generate([*map(Chunk, DOCS), QUESTION],
                            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].text

    first = ServeRun(path, cluster, url)
    first.wait_ready()
    answer = ask(url)
    assert answer["choices"][0]["text"] == want
    assert answer["usage"]["mepic"]["compiled_tokens"] > 0       # a cold start compiles
    time.sleep(1.0)                                              # write-through demotion is asynchronous
    assert first.interrupt() == 0
    with pytest.raises(httpx.TransportError):                    # the app is really gone
        httpx.get(url + "/v1/models", timeout=5)

    second = ServeRun(path, cluster, url)
    try:
        second.wait_ready()
        stats = httpx.get(url + "/v1/mepic/stats", timeout=30).json()
        assert stats["running"] == stats["waiting"] == 0
        answer = ask(url)
        assert answer["choices"][0]["text"] == want
        assert answer["usage"]["mepic"]["compiled_tokens"] == 0     # the chunks came from the store
        assert answer["usage"]["mepic"]["chunks_miss"] == 0
    finally:
        assert second.interrupt() == 0
