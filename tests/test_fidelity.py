"""mepic_ray.fidelity and bench.fidelity: teacher forcing through the engine's step loop
equals one forward of transformers' own model over prompt + forced answer; the
comparison reads 0 KL and full agreement for full against itself and sees a reuse
mode's difference."""
import pytest
import torch
from transformers import AutoTokenizer

from bench.common import split_configs
from bench.fidelity import evaluate, parse_config, plain_prompt, summarize
from mepic_ray import LLM, Chunk
from mepic_ray.fidelity import compare, greedy_answer, teacher_forced_logprobs

PROMPT = "Read the passages, then answer. The river runs north to the sea. Question: where? Answer:"
C1 = "The first document says the bridge is made of stone and was built long ago."
C2 = "A second document, which only makes sense after the first one has been read."


pytestmark = pytest.mark.usefixtures("one_thread")


def make_llm(model_dir):
    def make(mode, options):
        return LLM(model_dir, mode=mode, num_blocks=256, block_size=8, mode_options=options)
    return make


@torch.no_grad()
def hf_logprobs(hf, ids):
    x = torch.tensor([ids])
    # An explicit all-ones mask, as in test_model_vs_hf: nothing of the sequence is padding.
    return torch.log_softmax(hf(x, attention_mask=torch.ones_like(x)).logits[0].float(), dim=-1)


def test_teacher_forcing_equals_one_full_forward(tiny_model_dir, tiny_hf_model):
    eng = make_llm(tiny_model_dir)("full", {}).engine
    ids = AutoTokenizer.from_pretrained(tiny_model_dir).encode(PROMPT, add_special_tokens=False)
    free, free_rows = greedy_answer(eng, PROMPT, 10)
    assert eng.make_request(PROMPT).stats.prompt_tokens == len(ids)
    ref = hf_logprobs(tiny_hf_model, ids + free)
    torch.testing.assert_close(free_rows, ref[len(ids) - 1:-1], atol=2e-4, rtol=1e-4)
    assert free == ref[len(ids) - 1:-1].argmax(-1).tolist()
    # A continuation the model would not pick itself: without the overwrite, every row
    # after the first would follow the engine's greedy path instead.
    forced = [t for t in AutoTokenizer.from_pretrained(tiny_model_dir).encode(" zq xj vk!", add_special_tokens=False)]
    assert forced[0] != free[0]
    got = teacher_forced_logprobs(eng, PROMPT, forced)
    torch.testing.assert_close(got, hf_logprobs(tiny_hf_model, ids + forced)[len(ids) - 1:-1], atol=2e-4, rtol=1e-4)


def test_greedy_answer_keeps_its_eos(tiny_model_dir):
    eng = make_llm(tiny_model_dir)("full", {}).engine
    free, rows = greedy_answer(eng, PROMPT, 8)
    # The random model never says </s>: make the last new token it says the EOS (it
    # often repeats one token, and then the answer is that EOS alone).
    k = max(i for i, t in enumerate(free) if t not in free[:i])
    eng.output.eos_ids = {free[k]}
    short, short_rows = greedy_answer(eng, PROMPT, 8)
    assert short == free[:k + 1]
    torch.testing.assert_close(short_rows, rows[:k + 1])


def test_full_against_itself_is_exact_and_naive_is_not(tiny_model_dir):
    prompts = [["Context: ", Chunk(C1), " and ", Chunk(C2), " Question: which? Answer:"],
               ["Other order: ", Chunk(C2), " then ", Chunk(C1), " Question: why? Answer:"],
               ["Context: ", Chunk(C1), " and ", Chunk(C2), " Question: when? Answer:"]]   # reuses both
    res = evaluate(["full", "naive", "mepic:no_such_option=1"], prompts, make_llm(tiny_model_dir), 6)
    full, naive = res["configs"]["full"], res["configs"]["naive"]
    assert "no_such_option" in res["configs"]["mepic:no_such_option=1"]["error"]
    for r in full["requests"]:
        assert max(r["kl"]) < 1e-6 and all(r["top1"]) and r["first_token"]
    assert max(max(r["kl"]) for r in naive["requests"]) > 1e-3
    assert naive["peak_blocks"] > 0 and full["peak_blocks"] > 0
    s = summarize(res, reps=200)
    assert set(s) == {"full", "naive"}
    assert s["full"]["first_token"]["mean"] == 1.0 and s["full"]["mean_kl"]["mean"] < 1e-6
    assert s["full"]["top1"] == {"mean": 1.0, "diff": 0.0, "lo": 0.0, "hi": 0.0}
    assert s["naive"]["mean_kl"]["lo"] > 0


def test_compare_on_a_planted_difference():
    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    assert compare(ref, ref)["mean_kl"] == pytest.approx(0.0, abs=1e-7)
    got = ref.clone()
    got[0] = torch.log_softmax(torch.tensor([0.0, 2.0, 0.0]), -1)
    c = compare(ref, got)
    p = ref[0].exp()
    assert c["kl"][0] == pytest.approx((p * (ref[0] - got[0])).sum().item(), rel=1e-6)
    assert c["top1"] == [False, True] and not c["first_token"] and c["top1_rate"] == 0.5


def test_config_syntax():
    assert parse_config("mepic@2") == ("mepic", {"recompute_blocks": 2})
    assert parse_config("epic:recompute_tokens=32") == ("epic", {"recompute_tokens": 32})
    assert parse_config("cacheblend:ratio=0.3,check_layer=2") == ("cacheblend", {"ratio": 0.3, "check_layer": 2})
    assert split_configs("full,cacheblend:ratio=0.3,check_layer=2,mepic@2,mepic:recompute_tokens=16") == [
        "full", "cacheblend:ratio=0.3,check_layer=2", "mepic@2", "mepic:recompute_tokens=16"]
    with pytest.raises(ValueError):
        parse_config("mepic:recompute_blocks")


def test_plain_prompt_keeps_passages_and_question():
    chat = ["<|im_start|>system\n...", Chunk("Passage: first text\n"), Chunk("Passage: second\n"), "Question: q?"]
    p = plain_prompt(chat, "q?")
    assert [c.text for c in p if isinstance(c, Chunk)] == ["first text\n", "second\n"]
    assert p[-1] == "Question: q?\nAnswer:" and "<|im_start|>" not in p[0]
