"""Engine and model configuration, validated at construction."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from mepic_ray.core.policy import ReusePolicy, make_policy

DEFAULT_SEPARATOR = " # # "  # LMCache's blend_special_str


def compiler_missing(device: str) -> str | None:
    """Why torch.compile cannot run on ``device`` here, or None."""
    if device == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            return "torch_compile on CPU needs a C++ compiler (g++, clang++ or $CXX) on the PATH"
    return None


@dataclass
class EngineConfig:
    model: str | None = None
    mode: str = "mepic"
    block_size: int = 16
    # The KV pool: num_blocks if given, else kv_cache_bytes if given, else this fraction of
    # the device's memory (host RAM on CPU), never more than half of what is free once the
    # weights are loaded (other replicas share the machine).
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.1
    num_blocks: int | None = None
    max_num_seqs: int = 32
    # Tokens one step computes at most: decodes, prompt and recomputed slots, chunk
    # compiles; longer prefills are split across steps.
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None       # defaults to the model's context
    separator: str = DEFAULT_SEPARATOR
    # The mode's own knobs (mepic: recompute_blocks; epic: recompute_tokens, host_copy_bytes;
    # cacheblend: ratio, check_layer, host_copy_bytes), validated by the mode's policy.
    mode_options: dict = field(default_factory=dict)
    dtype: str = "float32"
    device: str = "cpu"
    # Fuse each layer's norms, projections, SiLU and residual adds with torch.compile
    # (worker/dense.py); attention stays eager. Compiles at start (seconds to a minute).
    torch_compile: bool = False
    attention_backend: str = "auto"        # auto: Triton on CUDA, torch reference on CPU
    # Triton backend only (see mepic_ray/kernels/triton_attention.py): turn K tiles that are one run
    # of positions by R(c) R(j); rotate a prefill's keys once into a scratch; let one
    # prefill program take all query heads of a KV head.
    triton_rope_runs: bool = False
    triton_rotate_keys_once: bool = False
    triton_pack_gqa: bool = False
    seed: int = 0
    # CPU only: large temporaries (a prefill's MLP activations are ~100 MB) come from the
    # C heap, and up to this many freed bytes stay there for the next step, instead of a
    # fresh mmap and its page faults per temporary (1.2x on prefill). 0: glibc's defaults.
    host_heap_keep_bytes: int = 2**30

    def __post_init__(self) -> None:
        if not isinstance(self.mode_options, dict):
            raise ValueError(f"mode_options must be a mapping, got {type(self.mode_options).__name__}")
        self.reuse: ReusePolicy = make_policy(self.mode, self.mode_options)
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_bytes is not None and (isinstance(self.kv_cache_bytes, bool) or self.kv_cache_bytes <= 0):
            raise ValueError("kv_cache_bytes must be positive")
        if isinstance(self.kv_cache_memory_fraction, bool) or not 0.0 < self.kv_cache_memory_fraction <= 0.9:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 0.9], got {self.kv_cache_memory_fraction!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({self.max_num_seqs}): every running decode is in every step")
        if type(self.host_heap_keep_bytes) is not int or not 0 <= self.host_heap_keep_bytes < 2**31:
            raise ValueError(f"host_heap_keep_bytes must be in [0, 2**31), got {self.host_heap_keep_bytes!r}")
        if not self.separator:
            raise ValueError("separator must be a non-empty string")
        for name in ("triton_rope_runs", "triton_rotate_keys_once", "triton_pack_gqa", "torch_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.torch_compile and (why := compiler_missing(self.device)):
            raise ValueError(why)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        if cfg.get("model_type") not in ("llama", "mistral", "qwen2", None):
            raise ValueError(f"unsupported model_type {cfg.get('model_type')!r}: llama, mistral, qwen2")
        rope = dict(cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096), eos_token_ids=eos_ids,
        )


@dataclass
class StoreConfig:
    """The Ray object-store tier below every replica's KV pool."""
    name: str = "mepic_chunk_store"        # detached named actor shared by all replicas
    namespace: str = "mepic"
    budget_bytes: int = 1 * 2**30          # object-store bytes the tier may hold (LRU beyond)
    write_through: bool = True             # publish a chunk once compiled, not only on eviction
    timeout_s: float = 5.0                 # per store call; a slower store counts as a miss
    max_pending_bytes: int = 256 * 2**20   # demotions queued in host memory before dropping
    warm_fraction: float = 0.5             # of a new replica's pool filled from the store at start
    load_policy: str = "cost"              # cost: load when measured cheaper than compiling; always; never
    # After a failed or timed-out store call, requests skip the store (and compile) for
    # this long, doubling per further failure up to a minute: a hung store must not add
    # timeout_s to every miss.
    retry_after_s: float = 2.0
    resync_s: float = 10.0                 # how often to learn which published chunks the store evicted
    # Registered documents (POST /v1/chunks) may pin their KV in the store, never evicted,
    # up to this many bytes (None: half of budget_bytes).
    pin_budget_bytes: int | None = None
    warm_poll_s: float = 1.0               # how often a replica asks for documents registered with warm
    # Where the store actor lives: "head" survives the loss of any worker node (the head's
    # loss is the cluster's); "local": the node of the first replica that asks for it.
    placement: str = "head"
    # A replica being stopped (scale-down, redeploy) first demotes the chunks it holds that
    # the store lacks, for at most this long: keep it under Serve's graceful_shutdown_timeout_s.
    shutdown_demote_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.name or not self.namespace:
            raise ValueError("store name and namespace must be non-empty")
        if self.budget_bytes <= 0 or self.max_pending_bytes <= 0:
            raise ValueError("budget_bytes and max_pending_bytes must be positive")
        if self.timeout_s <= 0 or self.retry_after_s <= 0 or self.resync_s <= 0:
            raise ValueError("timeout_s, retry_after_s and resync_s must be positive")
        if self.load_policy not in ("cost", "always", "never"):
            raise ValueError(f"load_policy must be cost, always or never, got {self.load_policy!r}")
        if not 0.0 <= self.warm_fraction <= 1.0:
            raise ValueError("warm_fraction must be in [0, 1]")
        if self.pin_budget_bytes is not None and not 0 <= self.pin_budget_bytes <= self.budget_bytes:
            raise ValueError(f"pin_budget_bytes must be in [0, budget_bytes={self.budget_bytes}], "
                             f"got {self.pin_budget_bytes}")
        if self.warm_poll_s <= 0 or self.shutdown_demote_s < 0:
            raise ValueError("warm_poll_s must be positive and shutdown_demote_s non-negative")
        if self.placement not in ("head", "local"):
            raise ValueError(f"placement must be head or local, got {self.placement!r}")
