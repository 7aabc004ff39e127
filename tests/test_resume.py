"""An answer resumed after a replica died (``resume_ids``: its first tokens, already
streamed) continues exactly where the uninterrupted run would: the text streamed
before the cut plus the resumed deltas equals the uninterrupted answer, token for
token, stop strings included. The reference is the same request run without a cut."""
import pytest

from mepic_ray import LLM, Chunk, PromptError, SamplingParams

PROMPT = ["intro ", Chunk("a document about ships and harbours"), " question?"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, mode="mepic", block_size=8, num_blocks=512, max_model_len=256)


def run(llm, prompt, params, resume=(), rid="x"):
    eng = llm.engine
    eng.enqueue(eng.make_request(prompt, params, rid, resume_ids=resume))
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.request_id == rid]
    return outs


def cut(llm, prompt, params, k):
    """The first ``k`` streamed outputs of an uninterrupted run: what a client saw."""
    streamed = list(llm.stream(prompt, params))
    return streamed, "".join(o.delta_text for o in streamed[:k]), streamed[k - 1].token_ids


@pytest.mark.parametrize("k", [1, 5, 17, 39])
def test_resumed_greedy_answer_joins_up_with_what_was_sent(llm, k):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    streamed, sent, sent_ids = cut(llm, PROMPT, params, k)
    whole = streamed[-1]
    outs = run(llm, PROMPT, params, sent_ids, f"resume-{k}")
    assert sent + "".join(o.delta_text for o in outs) == whole.text
    assert outs[-1].token_ids == whole.token_ids and outs[-1].text == whole.text
    assert outs[-1].finish_reason == "length" and len(outs) == 40 - k
    assert outs[-1].stats.prompt_tokens == whole.stats.prompt_tokens and outs[-1].stats.resumed_tokens == k
    for o, w in zip(outs, streamed[k:]):     # the new tokens' log-probabilities, computed in a prefill now
        assert o.delta_token_ids == w.delta_token_ids
        assert o.delta_logprobs[0][0] == pytest.approx(w.delta_logprobs[0][0], abs=1e-3)


def test_stop_string_across_the_cut(llm):
    free = list(llm.stream(PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
    text, ends = free[-1].text, []
    for o in free:      # the text's length after each token
        ends.append((ends[-1] if ends else 0) + len(o.delta_text))
    # A stop string that starts before the cut and ends after it: the cut must not lose
    # the part already matched (nor stream what was held back for it).
    a, k = next((a, k) for a in range(len(text) - 4) if text.find(text[a:a + 4]) == a
                for k in range(1, len(ends)) if a < ends[k - 1] < a + 4)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[text[a:a + 4]])
    streamed, sent, sent_ids = cut(llm, PROMPT, params, k)
    whole = streamed[-1]
    assert whole.text == text[:a] and whole.finish_reason == "stop"
    outs = run(llm, PROMPT, params, sent_ids, "resume-stop")
    assert sent + "".join(o.delta_text for o in outs) == whole.text and outs[-1].finish_reason == "stop"


def test_resumed_seeded_sample_is_reproducible_and_valid(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=3, seed=7, logprobs=3, ignore_eos=True)
    streamed, _, sent_ids = cut(llm, PROMPT, params, 6)
    a = run(llm, PROMPT, params, sent_ids, "sample-a")
    b = run(llm, PROMPT, params, sent_ids, "sample-b")
    assert [o.delta_token_ids for o in a] == [o.delta_token_ids for o in b]
    # Each new token is one of the 3 likeliest under the model (top_k=3 is respected).
    for o in a:
        (tok,), ((_, top),) = o.delta_token_ids, o.delta_logprobs
        assert tok in [t for t, _ in top]


def test_bad_resume_is_refused(llm):
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(PromptError, match="max_tokens"):
        llm.engine.make_request(PROMPT, params, "r1", resume_ids=[65] * 4)
    with pytest.raises(PromptError, match="ints"):
        llm.engine.make_request(PROMPT, params, "r2", resume_ids=["a"])
    with pytest.raises(PromptError, match="vocabulary"):
        llm.engine.make_request(PROMPT, params, "r3", resume_ids=[10**6])
    eos = next(iter(llm.engine.eos_ids))
    with pytest.raises(ValueError, match="already end"):
        llm.engine.make_request(PROMPT, params, "r4", resume_ids=[65, eos])
