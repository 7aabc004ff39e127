"""Continuous batching, sampling, streaming and per-request stats."""
import pytest
import torch

from mepic_ray import LLM, Chunk, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture()
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, mode="mepic", num_blocks=256, block_size=8)


def test_requests_join_while_others_decode(tiny_model_dir, llm):
    prompts = ["first prompt, decoding already", ["S: ", Chunk("a shared document body"), " Q?"],
               "third one arrives late"]
    alone = [LLM(tiny_model_dir, mode="mepic", num_blocks=256, block_size=8).generate(p, GREEDY)[0].token_ids
             for p in prompts]
    eng = llm.engine
    done = {}
    eng.add_request(prompts[0], GREEDY, "a")
    for _ in range(3):
        eng.step()
    eng.add_request(prompts[1], GREEDY, "b")
    out = eng.step()     # b's prefill and a's decode in one batch
    assert {o.request_id for o in out} == {"a", "b"}
    eng.add_request(prompts[2], GREEDY, "c")
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    assert [done["a"], done["b"], done["c"]] == alone


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llm):
    p = SamplingParams(max_tokens=10, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    a = llm.generate("sampling test", p)[0].token_ids
    b = llm.generate("sampling test", p)[0].token_ids
    assert a == b
    c = llm.generate("sampling test", SamplingParams(max_tokens=10, temperature=1.5, seed=8, ignore_eos=True))[0]
    greedy = llm.generate("sampling test", GREEDY)[0].token_ids
    top1 = llm.generate("sampling test", SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=3,
                                                         ignore_eos=True))[0].token_ids
    assert top1 == greedy
    assert c.token_ids != a or len(set(a)) == 1


def test_sampling_distribution_matches_softmax(tiny_model_dir):
    """First sampled token frequencies follow softmax(logits / T) restricted to top-k."""
    llm = LLM(tiny_model_dir, mode="full", num_blocks=512, block_size=8)
    eng = llm.engine
    eng.add_request("distribution", SamplingParams(max_tokens=1, temperature=0))
    eng.step()
    probs = torch.softmax(eng.last_logits[0] / 2.0, -1)
    top = torch.topk(probs, 5)
    want = top.values / top.values.sum()
    outs = llm.generate(["distribution"] * 400, SamplingParams(max_tokens=1, temperature=2.0, top_k=5))
    counts = torch.zeros(5)
    for o in outs:
        assert o.token_ids[0] in top.indices.tolist()
        counts[top.indices.tolist().index(o.token_ids[0])] += 1
    assert torch.allclose(counts / 400, want, atol=0.08)


def test_stop_strings_and_streaming(llm):
    full = llm.generate("stream me", GREEDY)[0]
    deltas = list(llm.stream("stream me", GREEDY))
    assert len(deltas) == GREEDY.max_tokens and deltas[-1].finished
    assert "".join(d.delta_text for d in deltas) == full.text
    assert [d.delta_token_ids[0] for d in deltas] == full.token_ids
    if len(full.text) > 3:
        stop = full.text[2:4]
        out = llm.generate("stream me", SamplingParams(max_tokens=8, temperature=0, stop=[stop], ignore_eos=True))[0]
        assert out.finish_reason == "stop" and out.text == full.text[:full.text.find(stop)]


def test_streamed_text_is_stable_across_split_multibyte_characters(llm):
    """Byte-level tokens split UTF-8 characters; a streamed delta must never carry a
    replacement character that later turns into the real one (or repeat text), so the
    deltas always add up to the full decode of the tokens."""
    tok = llm.engine.tokenizer
    completed = 0
    for i in range(6):
        params = SamplingParams(max_tokens=300, temperature=1.0, seed=i, ignore_eos=True)
        deltas = list(llm.stream(f"bytes {i}", params))
        ids = [t for d in deltas for t in d.delta_token_ids]
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(d.delta_text for d in deltas) == full == deltas[-1].text
        # The case is exercised: a character whose bytes came from several tokens.
        completed += sum(1 for c in full if ord(c) > 127 and c != "\ufffd")
    assert completed > 0


def test_stats_count_reuse(llm):
    doc = Chunk("a document that spans several blocks of tokens")
    first = llm.generate(["Sys: ", doc, " Q1?"], GREEDY)[0]
    second = llm.generate(["Other: ", doc, " Q2?"], GREEDY)[0]
    n_doc = len(llm.engine.encode(doc.text))
    pad = (-n_doc) % 8
    first_block_tokens = 8 - pad
    assert first.stats.compiled_tokens == n_doc and first.stats.cached_tokens == 0
    assert second.stats.compiled_tokens == 0
    assert second.stats.recomputed_tokens == first_block_tokens
    assert second.stats.cached_tokens == n_doc - first_block_tokens
    assert second.stats.ttft_s is not None and second.stats.ttft_s > 0 and second.stats.e2e_s >= second.stats.ttft_s
    s = llm.stats()
    assert s["num_chunks"] == 1 and s["used_blocks"] == 0


@pytest.mark.parametrize("params", [dict(top_p=5e-324), dict(temperature=1e-300), dict(top_k=10**9, top_p=1e-40)])
def test_degenerate_sampling_values_pick_the_argmax(params):
    """Values at the edge of float range must not turn the distribution into NaN (which
    would stop the engine loop for everyone): they reduce to the top token."""
    from mepic_ray.worker.sampler import sample
    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 4
    got = sample(logits, [SamplingParams(**params)] * 4, [torch.Generator().manual_seed(i) for i in range(4)])
    assert got == logits.argmax(dim=-1).tolist()


def test_pool_is_sized_from_the_machine_unless_told(tiny_model_dir):
    psutil = pytest.importorskip("psutil")
    from mepic_ray.config import EngineConfig
    from mepic_ray.engine import LLMEngine
    from mepic_ray.worker.memory import device_memory
    total, free = device_memory("cpu")
    assert total == pytest.approx(psutil.virtual_memory().total, rel=0.01)
    assert 0 < free <= total
    eng = LLMEngine(EngineConfig(model=tiny_model_dir, kv_cache_memory_fraction=0.01))
    pool = eng.num_blocks * eng.bytes_per_block
    assert pool <= min(0.01 * total, 0.5 * free) + eng.bytes_per_block
    assert pool >= min(0.01 * total, 0.25 * free) - eng.bytes_per_block   # free memory moves meanwhile
    assert f"{eng.num_blocks} blocks" in eng.pool_summary
    assert LLMEngine(EngineConfig(model=tiny_model_dir, kv_cache_bytes=64 * eng.bytes_per_block)).num_blocks == 64
    assert LLMEngine(EngineConfig(model=tiny_model_dir, kv_cache_bytes=2**30, num_blocks=7)).num_blocks == 7
    with pytest.raises(ValueError, match="fraction"):
        EngineConfig(kv_cache_memory_fraction=0.95)
