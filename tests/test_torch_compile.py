"""``torch_compile: true`` fuses the dense ops of each layer (worker/dense.py): the engine
still equals transformers' own model, in fp32 and within transformers' bf16 band, and a
machine without a C++ compiler gets a clear error before anything loads."""
import copy

import pytest
import torch

from conftest import make_tiny_llama
from mepic_ray import LLM, SamplingParams
from mepic_ray.config import EngineConfig, compiler_missing
from mepic_ray.worker import dense

# 150 byte tokens: the prefill goes through the compiled graphs (more than FEW_ROWS rows),
# the decodes (one row each) through the eager ops.
PROMPT = "The lighthouse keeper counted the ships that passed the rocks each night, " * 2
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
needs_compiler = pytest.mark.skipif(compiler_missing("cpu") is not None, reason="no C++ compiler")


def spy_compiled(llm) -> list[int]:
    """Rows each call of a compiled graph got (the graphs themselves are unchanged)."""
    calls, d = [], llm.engine.model.dense
    assert d.compiled is not None

    def wrap(fn):
        def run(x, *args):
            calls.append(x.shape[0])
            return fn(x, *args)
        return run
    d.compiled = tuple(wrap(fn) for fn in d.compiled)
    return calls


def prefill_logits(llm, prompt):
    eng = llm.engine
    eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    eng.step()
    return eng.last_logits[0].float().clone()


@needs_compiler
def test_compiled_full_matches_transformers(tmp_path):
    hf = make_tiny_llama(tmp_path, seed=3)
    llm = LLM(str(tmp_path), mode="full", num_blocks=64, block_size=8, torch_compile=True)
    calls = spy_compiled(llm)
    ids = llm.engine.encode(PROMPT)
    assert len(ids) > dense.FEW_ROWS
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(prefill_logits(llm, PROMPT), ref, atol=2e-4, rtol=1e-4)
    # Both graphs, once per layer, on the whole prompt.
    assert calls == [len(ids)] * (2 * hf.config.num_hidden_layers)
    out = llm.generate(PROMPT, GREEDY)[0]
    input_ids = torch.tensor([ids])
    want = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8, min_new_tokens=8,
                       do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == want


@needs_compiler
def test_compiled_bfloat16_is_within_transformers_own_band(tmp_path):
    hf = make_tiny_llama(tmp_path, seed=5)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    llm = LLM(str(tmp_path), mode="full", num_blocks=64, block_size=8, dtype="bfloat16", torch_compile=True)
    calls = spy_compiled(llm)
    ids = torch.tensor([llm.engine.encode(PROMPT)])
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
        band = (hf16(ids).logits[0, -1].float() - want).abs().max().item()
    got = prefill_logits(llm, PROMPT)
    assert calls and 0 < band < 0.2
    assert (got - want).abs().max().item() <= 2 * band


def test_without_a_compiler_the_engine_refuses_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))        # an empty folder: no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        # No model at this path either: the compiler check must come first.
        LLM(str(tmp_path / "absent"), mode="full", num_blocks=8, torch_compile=True)
    assert compiler_missing("cuda") is None


def test_torch_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="torch_compile"):
        EngineConfig(torch_compile="yes")


@needs_compiler
def test_the_serving_engine_thread_runs_the_compiled_graphs(tmp_path):
    """A replica compiles while it starts, then steps on its own thread: the graphs
    compiled on the first thread serve the second (no recompile, same answers)."""
    import asyncio

    from mepic_ray.async_engine import AsyncLLMEngine

    hf = make_tiny_llama(tmp_path, seed=7)
    engine = AsyncLLMEngine(EngineConfig(model=str(tmp_path), mode="full", num_blocks=64, block_size=8,
                                         torch_compile=True))
    calls = spy_compiled(engine)

    async def answer():
        outs = [o async for o in engine.generate(PROMPT, GREEDY, "r0")]
        return outs[-1].token_ids
    got = asyncio.run(answer())
    ids = engine.engine.encode(PROMPT)
    input_ids = torch.tensor([ids])
    want = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8, min_new_tokens=8,
                       do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert calls and got == want
