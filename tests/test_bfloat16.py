"""``dtype: bfloat16`` on CPU (the torch path; on CPUs with AMX its matmuls are many
times faster than fp32's): logits stay within the band that transformers' own model
moves in bf16, and the pool holds twice the blocks (chunk reuse in bf16 is checked
against transformers in test_reuse_vs_hf).

Reference: transformers' model in fp32, and the same model cast to bf16, which says
how far bf16 may move the logits at all."""
import copy

import torch

from conftest import make_tiny_llama
from mepic_ray import LLM, Chunk, SamplingParams

PROMPT = "Hello world, this is a test of the paged engine against the reference."
ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def prefill_logits(llm, prompt):
    eng = llm.engine
    eng.add_request(prompt, ONE)
    eng.step()
    return eng.last_logits[0].float().clone()


def test_bfloat16_full_is_within_transformers_own_bfloat16_band(tmp_path):
    hf = make_tiny_llama(tmp_path, seed=3)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    llm = LLM(str(tmp_path), mode="full", num_blocks=64, block_size=8, dtype="bfloat16")
    assert llm.engine.runner.k_cache.dtype == torch.bfloat16
    ids = torch.tensor([llm.engine.encode(PROMPT)])
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
        band = (hf16(ids).logits[0, -1].float() - want).abs().max().item()
    got = prefill_logits(llm, PROMPT)
    assert 0 < band < 0.2     # the band is bf16 rounding, far below a wrong model's error
    assert (got - want).abs().max().item() <= 2 * band
    out = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


def test_bfloat16_pool_holds_twice_the_blocks(tmp_path):
    """The same bytes hold twice the blocks (2 bytes an element, not 4), and chunks are
    read back from them (their logits against transformers: test_reuse_vs_hf)."""
    make_tiny_llama(tmp_path, seed=4)
    doc_a, doc_b = Chunk("lighthouses guide the ships along the coast " * 2), Chunk("glaciers carve valleys " * 3)
    layouts = [["Read: ", doc_a, doc_b, " Q: what guides ships? A:"],
               ["Other intro. ", doc_b, doc_a, " Q: what carves valleys? A:"]]
    blocks = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(tmp_path), mode="mepic", kv_cache_bytes=4 * 2**20, block_size=8, dtype=dtype)
        blocks[dtype] = llm.engine.num_blocks
        llm.generate(layouts[0], ONE)
        second = llm.generate(layouts[1], ONE)[0]
        assert second.stats.cached_tokens > 0        # both chunks read from the pool
    assert blocks["bfloat16"] == 2 * blocks["float32"]
