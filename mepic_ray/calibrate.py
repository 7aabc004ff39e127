"""`python -m mepic_ray.calibrate`: is a reuse mode safe for this model? Runs the built-in
calibration set (``calibration_set.py``) through full recompute and the mode on the
loaded model, teacher-forced on full's answers (``fidelity.py``), and prints first-token
agreement, top-1 agreement and KL per prompt layout. The server runs the same check at
start-up (``quality_gate`` in the YAML) and refuses a mode that falls below the
threshold, naming options that pass.

    python -m mepic_ray.calibrate --mode mepic --mode-options '{"block_ratio": 0.25}'
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from mepic_ray.calibration_set import FORMATS, PASSAGES, calibration_prompts
from mepic_ray.config import EngineConfig
from mepic_ray.fidelity import Fidelity, compare, greedy_answer, summary, teacher_forced_logprobs

log = logging.getLogger(__name__)
# Tried in this order when a configuration fails, to name one that passes.
FALLBACKS = ({"mode": "mepic", "mode_options": {"block_ratio": 0.25}},
             {"mode": "mepic", "mode_options": {"block_ratio": 0.5}},
             {"mode": "full", "mode_options": {}})


class QualityGateError(RuntimeError):
    """The configured mode's answers are too far from full recompute's on this model."""


@dataclass(frozen=True)
class QualityGate:
    min_first_token_agreement: float = 0.9
    max_kl: float | None = None     # also bound the mean KL(full || mode), nats, on every layout
    on_failure: str = "refuse"      # or "warn": serve anyway, with a warning
    prompts: int = 16               # per prompt layout
    passages: int = 8
    max_tokens: int = 8
    # The layouts checked: the chat route's by default. Plain completion prompts make
    # SmolLM2 answer end-of-sequence first even in full recompute (bench/results/layouts.md).
    formats: tuple[str, ...] = ("chat",)
    suggest: bool = True            # on failure, measure FALLBACKS to name one that passes

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_first_token_agreement <= 1.0:
            raise ValueError("min_first_token_agreement must be in [0, 1]")
        if self.max_kl is not None and not self.max_kl >= 0:
            raise ValueError("max_kl must be >= 0 (or null)")
        if self.on_failure not in ("refuse", "warn"):
            raise ValueError(f"on_failure must be 'refuse' or 'warn', got {self.on_failure!r}")
        if self.prompts < 1 or not 1 <= self.passages <= len(PASSAGES) or self.max_tokens < 1:
            raise ValueError("prompts, passages and max_tokens must be >= 1 (passages at most "
                             f"{len(PASSAGES)})")
        if not self.formats or set(self.formats) - set(FORMATS):
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}")


@dataclass
class Report:
    mode: str
    mode_options: dict
    per_format: dict[str, Fidelity] = field(default_factory=dict)

    @property
    def first_token(self) -> float:
        return min(f.first_token for f in self.per_format.values())

    @property
    def kl(self) -> float:
        return max(f.kl for f in self.per_format.values())

    def passes(self, gate: "QualityGate") -> bool:
        return self.first_token >= gate.min_first_token_agreement and (gate.max_kl is None or self.kl <= gate.max_kl)

    def table(self) -> str:
        rows = [f"| {fmt} | {f.first_token:.3f} | {f.top1:.3f} | {f.kl:.4f} |" for fmt, f in self.per_format.items()]
        return "\n".join([f"{self.mode} {json.dumps(self.mode_options)}",
                          "| layout | first-token agreement | top-1 agreement | KL(full ‖ mode), nats |",
                          "|---|---|---|---|", *rows])


def _calibration_engine(cfg: EngineConfig, mode: str, mode_options: dict):
    from mepic_ray.engine import LLMEngine
    return LLMEngine(replace(cfg, mode=mode, mode_options=dict(mode_options), kv_cache_bytes=64 * 2**20,
                             num_blocks=None))


def measure(engine, full, gate: QualityGate, progress: bool = False) -> Report:
    """Fidelity of ``engine`` against ``full`` (an engine in mode full on the same model)."""
    cfg = engine.cfg
    report = Report(cfg.mode, dict(cfg.mode_options))
    jobs = [(fmt, p) for fmt in gate.formats
            for p in calibration_prompts(full.tokenizer, cfg.separator, fmt, gate.prompts, gate.passages)]
    scores: dict[str, list[dict]] = {fmt: [] for fmt in gate.formats}
    for fmt, prompt in tqdm(jobs, desc=f"calibrating {cfg.mode}", disable=not progress):
        answer, reference = greedy_answer(full, prompt, gate.max_tokens)
        scores[fmt].append(compare(reference, teacher_forced_logprobs(engine, prompt, answer)))
    report.per_format = {fmt: summary(cs) for fmt, cs in scores.items()}
    engine.reset_cache()
    return report


def _cache_path(engine, gate: QualityGate) -> Path:
    key = json.dumps([engine.fingerprint, engine.cfg.mode, engine.cfg.mode_options, engine.cfg.block_size,
                      engine.cfg.dtype, engine.cfg.torch_compile, asdict(gate), PASSAGES], sort_keys=True,
                     default=str)
    root = Path(os.environ.get("MEPIC_CACHE_DIR", Path.home() / ".cache" / "mepic_ray")) / "calibration"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def check(engine, gate: QualityGate) -> Report:
    """The start-up gate: measure (or read the cached result for this model, mode and
    options), then pass, warn, or raise QualityGateError naming options that pass."""
    path = _cache_path(engine, gate)
    report = _cached(path)
    if report is None:
        report = measure(engine, _calibration_engine(engine.cfg, "full", {}), gate)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Replicas starting together may all measure: each writes whole, then renames.
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"mode": report.mode, "mode_options": report.mode_options,
                                   "per_format": {k: asdict(v) for k, v in report.per_format.items()}}))
        os.replace(tmp, path)
    log.info("quality gate:\n%s", report.table())
    if report.passes(gate):
        return report
    message = (f"mode {engine.cfg.mode!r} with options {engine.cfg.mode_options} agrees with full recompute on "
               f"the first answer token in {report.first_token:.0%} of the calibration prompts (mean KL up to "
               f"{report.kl:.4f} nats), short of quality_gate (min_first_token_agreement="
               f"{gate.min_first_token_agreement}, max_kl={gate.max_kl}).")
    if gate.suggest and gate.on_failure == "refuse":
        message += " " + _suggestion(engine, gate)
    if gate.on_failure == "warn":
        log.warning("%s Serving anyway (quality_gate.on_failure: warn).", message)
        return report
    raise QualityGateError(message + " Set quality_gate.on_failure: warn to serve anyway.")


def _cached(path: Path) -> Report | None:
    try:
        data = json.loads(path.read_text())
        return Report(data["mode"], data["mode_options"], {k: Fidelity(**v) for k, v in data["per_format"].items()})
    except (OSError, ValueError, KeyError, TypeError):   # none yet, or unreadable: measure again
        return None


def _suggestion(engine, gate: QualityGate) -> str:
    full = _calibration_engine(engine.cfg, "full", {})
    for option in FALLBACKS:
        if option["mode"] == "full":
            return "Only mode 'full' passes on this model."
        candidate = _calibration_engine(engine.cfg, option["mode"], option["mode_options"])
        if measure(candidate, full, gate).passes(gate):
            return f"Passing: mode {option['mode']!r} with mode_options {option['mode_options']}."
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--mode", default="mepic")
    ap.add_argument("--mode-options", default="{}", help="JSON object")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="the dtype the replicas serve in")
    ap.add_argument("--torch-compile", action="store_true", help="as replicas with torch_compile: true serve")
    ap.add_argument("--prompts", type=int, default=QualityGate.prompts)
    ap.add_argument("--passages", type=int, default=QualityGate.passages)
    ap.add_argument("--max-tokens", type=int, default=QualityGate.max_tokens)
    ap.add_argument("--threshold", type=float, default=QualityGate.min_first_token_agreement)
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {FORMATS}")
    args = ap.parse_args()
    gate = QualityGate(args.threshold, prompts=args.prompts, passages=args.passages, max_tokens=args.max_tokens,
                       formats=tuple(args.formats.split(",")))
    cfg = EngineConfig(model=args.model, block_size=args.block_size, dtype=args.dtype,
                       torch_compile=args.torch_compile)
    engine = _calibration_engine(cfg, args.mode, json.loads(args.mode_options))
    report = measure(engine, _calibration_engine(cfg, "full", {}), gate, progress=True)
    print(report.table())
    verdict = "passes" if report.passes(gate) else "fails"
    print(f"\n{verdict} the gate (first-token agreement >= {gate.min_first_token_agreement} on every layout)")


if __name__ == "__main__":
    main()
