"""The start-up quality gate (the fidelity figures it reads are tested in
test_fidelity.py), on the tiny model: a threshold no mode can miss passes; one that
chunk reuse must miss (KL 0: chunks that never saw each other cannot match full
attention exactly) refuses, naming an option that passes, or warns when told to."""
import pytest

from mepic_ray.calibrate import QualityGate, QualityGateError, check, measure
from mepic_ray.config import EngineConfig, compiler_missing
from mepic_ray.engine import LLMEngine


def engine(model_dir, mode="full", dtype="float32", torch_compile=False, **options):
    return LLMEngine(EngineConfig(model=model_dir, mode=mode, block_size=8, num_blocks=512, max_model_len=1024,
                                  mode_options=options, dtype=dtype, torch_compile=torch_compile))


def test_gate_passes_warns_and_refuses(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MEPIC_CACHE_DIR", str(tmp_path))
    small = dict(prompts=3, passages=3, max_tokens=3, formats=("chat", "plain"))
    naive = engine(tiny_model_dir, "naive")
    report = check(naive, QualityGate(0.0, **small))
    assert set(report.per_format) == {"chat", "plain"} and report.kl > 0
    # The same result from the cache, and the same as a fresh measurement.
    again = measure(naive, engine(tiny_model_dir), QualityGate(0.0, **small))
    assert check(naive, QualityGate(0.0, **small)).per_format == again.per_format == report.per_format
    # A replica serving in bf16 is judged in bf16, never by the fp32 result in the cache.
    naive16 = engine(tiny_model_dir, "naive", dtype="bfloat16")
    fresh16 = measure(naive16, engine(tiny_model_dir, dtype="bfloat16"), QualityGate(0.0, **small))
    assert fresh16.kl != report.kl
    assert check(naive16, QualityGate(0.0, **small)).kl == fresh16.kl
    # Chunks that never see each other cannot match full attention exactly: max_kl 0 refuses,
    # and names an option that passes (block selection, or full itself).
    with pytest.raises(QualityGateError, match="Passing: mode|Only mode 'full'"):
        check(naive, QualityGate(0.0, max_kl=0.0, **small))
    assert check(naive, QualityGate(0.0, max_kl=0.0, on_failure="warn", **small)) is not None
    assert "Serving anyway" in caplog.text
    for bad in (dict(on_failure="maybe"), dict(min_first_token_agreement=1.5), dict(max_kl=-1.0)):
        with pytest.raises(ValueError):
            QualityGate(**bad)


@pytest.mark.skipif(compiler_missing("cpu") is not None, reason="no C++ compiler")
def test_a_compiled_replica_is_judged_compiled(tiny_model_dir, tmp_path, monkeypatch):
    """Compiled bf16 rounds once per fused loop, eager bf16 once per op: the cached eager
    result must not stand for a replica serving compiled."""
    monkeypatch.setenv("MEPIC_CACHE_DIR", str(tmp_path))
    small = dict(prompts=3, passages=3, max_tokens=3, formats=("plain",))
    eager = check(engine(tiny_model_dir, "naive", dtype="bfloat16"), QualityGate(0.0, **small))
    compiled = engine(tiny_model_dir, "naive", dtype="bfloat16", torch_compile=True)
    fresh = measure(compiled, engine(tiny_model_dir, dtype="bfloat16", torch_compile=True), QualityGate(0.0, **small))
    assert fresh.kl != eager.kl
    assert check(compiled, QualityGate(0.0, **small)).kl == fresh.kl


def test_replica_refuses_to_start_below_the_gate(tiny_model_dir, tmp_path, monkeypatch):
    from deployments.replica import EngineServer
    monkeypatch.setenv("MEPIC_CACHE_DIR", str(tmp_path))
    cfg = {"model": tiny_model_dir, "mode": "naive", "block_size": 8, "num_blocks": 512, "max_model_len": 1024}
    gate = {"min_first_token_agreement": 0.0, "max_kl": 0.0, "prompts": 2, "passages": 2, "max_tokens": 2,
            "suggest": False}
    with pytest.raises(QualityGateError, match="naive.*on_failure: warn"):
        EngineServer.func_or_class(cfg, None, gate)
