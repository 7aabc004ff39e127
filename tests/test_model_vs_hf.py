"""Test 1 and 2: `full` mode equals transformers' own model; `mepic` with nothing
reused equals `full`."""
import pytest
import torch

from conftest import make_tiny_llama
from mepic_ray import LLM, Chunk, SamplingParams

PROMPT = "Hello world, this is a test of the paged engine against the reference."
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prefill_logits(llm, prompt):
    eng = llm.engine
    eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    eng.step()
    return eng.last_logits[0].clone()


def hf_greedy(hf, ids, n):
    # An explicit all-ones mask: without it generate masks out every prompt token equal to
    # pad_token_id, and the byte tokenizer's ids come in a different order each process,
    # so some runs gave a prompt byte id 0 and the oracle attended to a shorter prompt.
    input_ids = torch.tensor([ids])
    out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, do_sample=False,
                      min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


VARIANTS = {
    "llama": {},
    "qwen2-bias-untied": {"qwen2": True, "tie": False},
    "llama3-rope-scaling": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    "gqa-1": {"heads": 4, "kv_heads": 4},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_mode_matches_transformers_tiny(tmp_path, variant):
    hf = make_tiny_llama(tmp_path, seed=3, **VARIANTS[variant])
    llm = LLM(str(tmp_path), mode="full", num_blocks=64, block_size=8)
    ids = llm.engine.encode(PROMPT)
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(prefill_logits(llm, PROMPT), ref_logits, atol=2e-4, rtol=1e-4)
    out = llm.generate(PROMPT, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, ids, GREEDY.max_tokens)
    # Each decode step's log-probabilities too (one row: the engine's few-row products).
    scored = llm.generate(PROMPT, SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True,
                                                 logprobs=1))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids + scored.token_ids])).logits[0].float(), dim=-1)
    got = [chosen for chosen, _ in scored.logprobs]
    want = [ref[len(ids) - 1 + i, t].item() for i, t in enumerate(scored.token_ids)]
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_match_transformers(tmp_path, temperature):
    """Reported log-probabilities are the model's own (before temperature), for the
    sampled token and the top alternatives, at every generated position."""
    hf = make_tiny_llama(tmp_path, seed=5)
    llm = LLM(str(tmp_path), mode="full", num_blocks=64, block_size=8)
    params = SamplingParams(max_tokens=8, temperature=temperature, seed=1, ignore_eos=True, logprobs=3)
    out = llm.generate(PROMPT, params)[0]
    ids = llm.engine.encode(PROMPT)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids + out.token_ids])).logits[0].float(), dim=-1)
    assert len(out.logprobs) == len(out.token_ids) == 8
    for i, (chosen, top) in enumerate(out.logprobs):
        row = ref[len(ids) - 1 + i]
        assert chosen == pytest.approx(row[out.token_ids[i]].item(), abs=1e-4)
        want = row.topk(3)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)
    streamed = [d.delta_logprobs[0] for d in llm.stream(PROMPT, params)]
    assert [c for c, _ in streamed] == pytest.approx([c for c, _ in out.logprobs], abs=1e-5)


def test_full_mode_matches_transformers_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    llm = LLM(smollm2_dir, mode="full", kv_cache_bytes=64 * 2**20)
    prompt = "The capital of France is Paris. The capital of Germany is"
    ids = llm.engine.encode(prompt)
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0, -1]
    got = prefill_logits(llm, prompt)
    torch.testing.assert_close(got, ref_logits, atol=2e-3, rtol=1e-3)
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, ids, 8)
    assert "Berlin" in out.text


def test_default_model_is_embedded_smollm2(smollm2_dir):
    """No model argument: the embedded GGUF, dequantized once and cached."""
    llm = LLM(kv_cache_bytes=16 * 2**20)
    assert str(llm.engine.model_path) == smollm2_dir
    assert llm.engine.model_config.num_layers == 30
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=4, temperature=0))
    assert out.token_ids and out.stats.prompt_tokens > 10


@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_mepic_without_reuse_matches_full(tiny_model_dir, block_size):
    """Nothing reused: chunk-free prompts, and chunks no longer than a block (so the
    whole chunk is its recomputed first block). Padding must not change a thing."""
    full = LLM(tiny_model_dir, mode="full", num_blocks=128, block_size=block_size)
    prompts = [
        "A plain prompt with no chunks at all, long enough to span blocks.",
        ["System: read. ", Chunk("abc"), Chunk("de f" * (block_size // 4)), " Question?"],
        ["Intro", Chunk("x" * block_size), " mid ", Chunk("yz"), " end."],
    ]
    for prompt in prompts:
        mepic = LLM(tiny_model_dir, mode="mepic", num_blocks=128, block_size=block_size)
        want = full.generate(prompt, GREEDY)[0]
        got = mepic.generate(prompt, GREEDY)[0]
        assert got.token_ids == want.token_ids
        chunks = [c for c in prompt if isinstance(c, Chunk)] if isinstance(prompt, list) else []
        assert got.stats.recomputed_tokens == sum(len(mepic.engine.encode(c.text)) for c in chunks)
        assert got.stats.cached_tokens == 0
        torch.testing.assert_close(prefill_logits(LLM(tiny_model_dir, mode="mepic", num_blocks=128, block_size=block_size), prompt),
                                   prefill_logits(full, prompt), atol=1e-4, rtol=1e-4)
