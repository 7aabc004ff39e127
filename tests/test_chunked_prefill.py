"""Chunked prefill, on-demand pages and preemption against the engine with room to
spare: a prefill split across steps (inside chunk compiles and recomputed blocks
too) gives the same logits as one whole prefill, and a pool small enough to force
preemption gives the same tokens as a large one, in every mode."""
import pytest
import torch

from conftest import make_tiny_llama
from mepic_ray import LLM, Chunk, SamplingParams
from test_reuse_vs_hf import REQUESTS, TOL, WINDOW, reference, segments

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = [("full", {}), ("prefix", {}), ("naive", {}), ("epic", {}), ("cacheblend", {}), ("mepic", {}),
         ("mepic", {"block_ratio": 0.5}), ("mepic", {"recompute_tokens": 12})]
IDS = [m + ("-" + "-".join(f"{k}{v}" for k, v in o.items()) if o else "") for m, o in MODES]
DOCS = [Chunk("the first shared document, long enough for several blocks " * 2),
        Chunk("a second document about something else entirely"),
        Chunk("third: short one")]
PROMPTS = [["System: answer. ", DOCS[0], DOCS[1], " Question one?"],
           ["Sys: ", DOCS[1], DOCS[2], DOCS[0], " Q two, a little longer?"],
           ["S ", DOCS[2], DOCS[0], " third question"],
           ["no chunks at all in this prompt, only text to prefill"]]
# Six requests of 7 to 11 pages that grow by 6 pages each: a 24-page pool admits a few at
# a time and must preempt as they grow; the largest still fits alone, uncapped.
SHORT = [Chunk("first shared doc, two blocks"), Chunk("second doc here"), Chunk("third: short")]
GROWING = [["Sys. ", SHORT[0], SHORT[1], f" Q{i}?"] if i % 2 else ["S ", SHORT[2], SHORT[0], f" q{i}"]
           for i in range(6)]


def final_logits(llm, prompt, max_steps=200):
    """The logits the prefill ends with, and how many steps it took."""
    eng = llm.engine
    rid = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    for step in range(1, max_steps + 1):
        outs = [o for o in eng.step() if o.request_id == rid]
        assert eng.step_tokens <= eng.cfg.max_num_batched_tokens or eng.cfg.reuse.selection()
        if outs:
            return eng.last_logits[0].clone(), step
    raise AssertionError("prefill did not finish")


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    """Three layers: a layer's K/V computed from wrong K/V of the layer below shows at the
    logits only with at least three (two-layer models hide a compile reading a private
    copy's recomputed slots)."""
    path = tmp_path_factory.mktemp("tiny-llama-3")
    make_tiny_llama(path, layers=3, seed=1)
    return str(path)


@pytest.fixture(scope="module")
def deep_hf(deep_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(deep_model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_reference(hf, tok, prompt, mode):
    segs = segments(tok, prompt)
    if mode == "full":
        ids = [t for _, s in segs for t in s]
        return hf(torch.tensor([ids])).logits[0, -1]
    return reference(hf, segs, mode, 8)


@pytest.mark.parametrize("mode", ["full", "naive", "epic", "mepic", "mepic-window"])
@pytest.mark.parametrize("budget", [5, 13, 4096])
def test_chunked_prefill_matches_reference(deep_model_dir, deep_hf, mode, budget):
    """Split at 5 or 13 tokens a step (through blocks of 8, chunk compiles and recomputed
    blocks) or whole, every request's last logits equal transformers' reference, for
    new chunks and chunks reused from earlier requests."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(deep_model_dir)
    options = {"mode": "mepic", "mode_options": {"recompute_tokens": WINDOW}} if mode == "mepic-window" else {"mode": mode}
    llm = LLM(deep_model_dir, num_blocks=256, block_size=8, max_num_seqs=4, max_num_batched_tokens=budget, **options)
    most_steps = 0
    for prompt in REQUESTS:
        got, steps = final_logits(llm, prompt)
        most_steps = max(most_steps, steps)
        torch.testing.assert_close(got, hf_reference(deep_hf, tok, prompt, mode), **TOL,
                                   msg=lambda m: f"budget {budget}, {prompt!r}: {m}")
    assert most_steps > 1 or budget == 4096, "the prompts must not fit one step"


@pytest.mark.parametrize("mode,options", [("cacheblend", {}), ("mepic", {"block_ratio": 0.5})],
                         ids=["cacheblend", "mepic-block_ratio0.5"])
def test_chunked_selective_prefill_matches_whole_prefill(deep_model_dir, mode, options):
    """The probing modes (their whole prefill is checked against references elsewhere):
    split, the probe still picks the same slots and the logits are the whole prefill's."""
    whole = LLM(deep_model_dir, mode=mode, mode_options=options, num_blocks=256, block_size=8)
    pieces = {b: LLM(deep_model_dir, mode=mode, mode_options=options, num_blocks=256, block_size=8,
                     max_num_seqs=4, max_num_batched_tokens=b) for b in (5, 13)}
    for prompt in PROMPTS:     # later prompts reuse the earlier ones' chunks
        want, _ = final_logits(whole, prompt)
        for budget, llm in pieces.items():
            got, steps = final_logits(llm, prompt)
            assert steps > 1, "the prompt must not fit one step"
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4,
                                       msg=lambda m: f"budget {budget}, {prompt!r}: {m}")


def greedy_tokens(llm, prompts, params):
    eng = llm.engine
    rids = [eng.add_request(p, params) for p in prompts]
    done, saw_paused = {}, False
    for _ in range(5000):
        if not eng.has_unfinished():
            break
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
        saw_paused |= eng.stats()["waiting"] > 0 and eng.stats()["preemptions"] > 0
    return [done[r] for r in rids], saw_paused


@pytest.mark.parametrize("mode,options", MODES, ids=IDS)
def test_preemption_gives_the_tokens_of_a_large_pool(tiny_model_dir, mode, options):
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    big = LLM(tiny_model_dir, mode=mode, mode_options=options, num_blocks=512, block_size=8)
    want, _ = greedy_tokens(big, GROWING, params)
    small = LLM(tiny_model_dir, mode=mode, mode_options=options, num_blocks=24, block_size=8,
                max_num_seqs=8, max_num_batched_tokens=32)
    got, saw_paused = greedy_tokens(small, GROWING, params)
    assert small.stats()["preemptions"] > 0 and saw_paused, "the pool must be small enough to preempt"
    assert got == want
    small.reset_cache()
    assert small.stats()["free_blocks"] == small.stats()["total_blocks"]


def test_seeded_sampling_survives_preemption(tiny_model_dir):
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=11, ignore_eos=True)
    want, _ = greedy_tokens(LLM(tiny_model_dir, mode="mepic", num_blocks=512, block_size=8), GROWING, params)
    small = LLM(tiny_model_dir, mode="mepic", num_blocks=24, block_size=8, max_num_seqs=8,
                max_num_batched_tokens=32)
    got, _ = greedy_tokens(small, GROWING, params)
    assert small.stats()["preemptions"] > 0
    assert got == want


def test_a_long_prefill_never_stalls_running_decodes(tiny_model_dir):
    """While a long prompt is prefilled in pieces, the running decode gets a token every step."""
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    long_prompt = ["Intro. ", DOCS[0], DOCS[1], DOCS[2], " and a question at the end?"]
    alone = [LLM(tiny_model_dir, mode="mepic", num_blocks=256, block_size=8).generate(p, params)[0].token_ids
             for p in ("a short prompt that decodes", long_prompt)]
    llm = LLM(tiny_model_dir, mode="mepic", num_blocks=256, block_size=8, max_num_seqs=4, max_num_batched_tokens=16)
    eng = llm.engine
    eng.add_request("a short prompt that decodes", params, "a")
    while not eng.step():
        pass                                     # a's prefill, in pieces
    eng.add_request(long_prompt, params, "b")
    counts, done, b_first = {"a": 1}, {}, None
    for step in range(200):
        outs = {o.request_id: o for o in eng.step()}
        assert eng.step_tokens <= 16
        if "a" not in done:
            assert "a" in outs, f"a's decode skipped at step {step}"
        for rid, o in outs.items():
            if rid == "b" and b_first is None:
                b_first = step
            if o.finished:
                done[rid] = o.token_ids
        if len(done) == 2:
            break
    assert b_first is not None and b_first >= 3, "b's prompt is prefilled over several steps"
    assert [done["a"], done["b"]] == alone
    assert eng.stats()["steps"] > 0
