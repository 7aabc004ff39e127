"""The engine on the Triton backend (interpreted on CPU) gives the same tokens as
on the torch reference backend, for every mode, CacheBlend's row selection included."""
import pytest
import torch

from conftest import make_tiny_llama
from mepic_ray import LLM, Chunk, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_hd32(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hd32")
    make_tiny_llama(path, seed=5, layers=2, hidden=64, heads=2, kv_heads=1)   # head_dim 32
    return str(path)


@pytest.mark.parametrize("mode,triton_options", [
    ("full", {}), ("mepic", {}), ("cacheblend", {}),
    ("mepic", {"triton_rope_runs": True, "triton_rotate_keys_once": True}),
    ("mepic", {"triton_rope_runs": True, "triton_pack_gqa": True})],
    ids=["full", "mepic", "cacheblend", "mepic-runs-once", "mepic-runs-packed"])
def test_triton_backend_matches_torch_backend(model_hd32, mode, triton_options):
    doc = Chunk("a document of some length for the kernel test")
    prompts = [["Sys: ", doc, " Q1?"], ["Other: ", doc, " Q2?"]]
    outs = {}
    for backend in ("torch", "triton"):
        options = triton_options if backend == "triton" else {}
        llm = LLM(model_hd32, mode=mode, num_blocks=32, block_size=16, attention_backend=backend, **options)
        assert llm.engine.runner.backend == backend
        if backend == "triton":
            fields = ("triton_rope_runs", "triton_rotate_keys_once", "triton_pack_gqa")
            assert llm.engine.runner.build_attention.keywords["options"] == {
                f.removeprefix("triton_"): options.get(f, False) for f in fields}
        first = llm.generate(prompts[0], GREEDY)[0].token_ids          # compiles the chunk
        second = llm.generate(prompts[1], GREEDY)[0].token_ids         # reuses it
        # Tokens of a tiny random model hide a lot; the last step's logits do not.
        outs[backend] = (first, second, llm.engine.last_logits.clone())
    assert outs["triton"][:2] == outs["torch"][:2]
    torch.testing.assert_close(outs["triton"][2], outs["torch"][2], atol=1e-4, rtol=1e-4)


def test_backend_choice_is_validated(model_hd32, tiny_model_dir):
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(model_hd32, attention_backend="cuda-magic", num_blocks=8)
    with pytest.raises(ValueError, match="triton_rope_runs must be true or false"):
        LLM(model_hd32, triton_rope_runs="yes", num_blocks=8)
    with pytest.raises(ValueError, match="head_dim >= 32"):
        LLM(tiny_model_dir, attention_backend="triton", num_blocks=8)     # head_dim 16
    assert LLM(model_hd32, num_blocks=8).engine.runner.backend == "torch"  # auto on CPU
