"""Stop strings and incremental detokenizing in the output processor, driven token by
token as the engine drives it, against a brute-force oracle computed from the whole
decoded text and against decoding everything at every step (the cost of a step and the
bounds on stop strings: ``test_stop_cost_and_bounds.py``)."""
from hypothesis import HealthCheck, given, settings, strategies as st

from mepic_ray.output_processor import OutputProcessor
from mepic_ray.sampling_params import SamplingParams
from stop_helpers import EOS, MAX_MODEL_LEN, TOK, FakeRequest, byte_ids, drive


def decoded(ids) -> str:
    return TOK.decode(ids, skip_special_tokens=True)


def oracle(ids, stops, max_tokens, eos_ids=(EOS,), ignore_eos=False, stop_token_ids=()):
    """What the request must end as, by brute force: the first token after which the text
    decoded from scratch (all of it once the request ends for another reason, else without
    a trailing U+FFFD, which later bytes may still complete) contains a stop string; the
    text cut at the stop string that ends first (of those, the one that starts first)."""
    for n in range(1, len(ids) + 1):
        tok = ids[n - 1]
        ends = (n >= max_tokens or n + 3 >= MAX_MODEL_LEN or tok in stop_token_ids
                or (not ignore_eos and tok in eos_ids))
        text = decoded(ids[:n])
        if not ends:
            text = text.rstrip("\ufffd")
        hits = [(e, e - len(s) + 1) for s in stops for e in range(len(text))
                if text[max(0, e - len(s) + 1):e + 1] == s]
        if hits:
            end, start = min(hits)
            return n, text[:start], "stop"
        if ends:
            reason = "length" if not (tok in stop_token_ids or (not ignore_eos and tok in eos_ids)) else "stop"
            return n, text, reason
    raise AssertionError("the request never ends")


def check_against_oracle(ids, stops, max_tokens, ignore_eos=False, stop_token_ids=()):
    max_tokens = min(max_tokens, len(ids))      # the request ends by the last token at the latest
    params = SamplingParams(max_tokens=max_tokens, stop=stops, ignore_eos=ignore_eos,
                            stop_token_ids=list(stop_token_ids))
    processor = OutputProcessor(TOK, {EOS}, MAX_MODEL_LEN)
    req, outs = drive(processor, params, ids)
    n, text, reason = oracle(ids, stops, max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids)
    assert outs[-1].finished and len(outs) == n
    assert outs[-1].text == req.text == text, (outs[-1].text, text)
    assert outs[-1].finish_reason == req.finish_reason == reason
    assert "".join(o.delta_text for o in outs) == text
    longest = max(map(len, stops), default=0)
    for i, o in enumerate(outs):
        assert text.startswith(o.text), (o.text, text)           # streamed text is never taken back
        assert not o.finished or i == len(outs) - 1
        if not o.finished:     # held back: only a tail that may still become a stop string
            stable = decoded(ids[:i + 1]).rstrip("\ufffd")
            assert stable.startswith(o.text)
            assert len(stable) - len(o.text) <= max(longest - 1, 0), (stable, o.text, stops)
    assert processor.active() == 0      # the per-request state goes with the request
    return outs


# Text with characters of 1 to 4 UTF-8 bytes (so split across byte tokens), invalid bytes
# (a lone continuation byte, a truncated sequence, 0xff), and the end-of-sequence token.
PIECES = ["a", "b", "ab", " ", "é", "你", "🦄", "\ufffd"]
RAW = [b"\x80", b"\xe4\xbd", b"\xff", b"\xf0\x9f"]


def encode_piece(p) -> list[int]:
    if p == "EOS":
        return [EOS]
    if isinstance(p, bytes):
        return byte_ids(p)
    return TOK.encode(p, add_special_tokens=False)


def test_byte_ids_decode_back():
    for b in (b"a\x80b", "你🦄".encode(), b"\xff\xe4\xbd"):
        assert decoded(byte_ids(b)) == b.decode("utf-8", "replace")
    assert decoded(byte_ids("你".encode())[:2]) == "\ufffd"       # a split character shows as U+FFFD


stop_texts = st.lists(st.sampled_from(["a", "b", "é", "你", "🦄", "\ufffd", " "]), min_size=1, max_size=4).map("".join)
pieces = st.lists(st.sampled_from(PIECES) | st.sampled_from(RAW) | st.just("EOS"), max_size=24)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=pieces, stops=st.lists(stop_texts, max_size=4), max_tokens=st.integers(1, 40),
       ignore_eos=st.booleans(), stop_token=st.booleans())
def test_stop_strings_against_brute_force(parts, stops, max_tokens, ignore_eos, stop_token):
    ids = [t for p in parts for t in encode_piece(p)] + byte_ids(b"z" * 40)    # enough to reach max_tokens
    stop_token_ids = (byte_ids(b"b")[0],) if stop_token else ()
    check_against_oracle(ids, stops, max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids)


def test_hand_picked_cases():
    ids = TOK.encode("hello world, hello there", add_special_tokens=False)
    outs = check_against_oracle(ids, ["lo t"], 100)
    assert outs[-1].text == "hello world, hel" and outs[-1].finish_reason == "stop"
    # Overlapping stop strings: the one that ends first wins, whatever their order.
    for stops in (["world, hello", "o w"], ["o w", "world, hello"]):
        assert check_against_oracle(ids, stops, 100)[-1].text == "hell"
    # A stop string split across the bytes of a character, and one made of a split character.
    ids = byte_ids("ab你好🦄cd".encode())
    assert check_against_oracle(ids, ["好🦄c"], 100)[-1].text == "ab你"
    assert check_against_oracle(ids, ["🦄"], 100)[-1].text == "ab你好"
    # A stop string never matches the U+FFFD standing for a character still arriving
    # (the full-decode processor stopped on the first byte of 你 here, answering "").
    assert check_against_oracle(byte_ids("你x".encode()), ["\ufffd"], 10)[-1].text == "你x"
    # Nothing of a character is streamed before all its bytes are in.
    outs = check_against_oracle(ids, [], 100)
    assert [o.delta_text for o in outs[:5]] == ["a", "b", "", "", "你"]
    # Invalid bytes stay U+FFFD; held while they may still be completed, streamed after.
    outs = check_against_oracle(byte_ids(b"x\xe4\xbdy\xff"), ["\ufffdy"], 100)
    assert outs[-1].text == "x" and outs[-1].finish_reason == "stop"
    outs = check_against_oracle(byte_ids(b"x\xe4\xbd"), [], 3)
    assert outs[-1].text == "x\ufffd" and outs[-1].finish_reason == "length"
    # A held tail is released when the request ends for another reason.
    outs = check_against_oracle(TOK.encode("abc", add_special_tokens=False) + [EOS], ["cde"], 100)
    assert [o.text for o in outs] == ["a", "ab", "ab", "abc"]
    assert outs[-1].finish_reason == "stop"


# --- the processor before incremental decoding and matching, as the reference on normal text ---
class FullDecodeProcessor:
    """The earlier algorithm: decode everything, search everything, hold back naively."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def process(self, req):
        p, tok = req.params, req.output_ids[-1]
        prev_text = req.text
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        if not p.ignore_eos and tok == EOS:
            req.finish_reason = "stop"
        for s in p.stop:
            i = text.find(s)
            if i >= 0:
                text, req.finish_reason = text[:i], "stop"
        if req.finish_reason is None and len(req.output_ids) >= p.max_tokens:
            req.finish_reason = "length"
        finished = req.finish_reason is not None
        if not finished:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                                         default=0)]
        if finished or text.startswith(prev_text):
            req.text = text
        return req.text[len(prev_text):], finished


def compare_with_full_decode(tokenizer, text, stops, max_tokens):
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=max_tokens, stop=stops)
    new, old = OutputProcessor(tokenizer, {EOS}, MAX_MODEL_LEN), FullDecodeProcessor(tokenizer)
    a, b = FakeRequest(params), FakeRequest(params)
    for t in ids:
        a.output_ids.append(t)
        b.output_ids.append(t)
        out = new.process(a)
        delta, finished = old.process(b)
        assert (out.delta_text, out.finished) == (delta, finished), (a.text, b.text)
        if finished:
            break
    assert (a.text, a.finish_reason) == (b.text, b.finish_reason)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from("ab é你🦄\n"), max_size=30), stop=st.text(st.sampled_from("ab é你🦄"), min_size=1,
                                                                             max_size=5), max_tokens=st.integers(1, 60))
def test_same_as_full_decode_on_normal_text(text, stop, max_tokens):
    """One stop string in valid text: every delta as the earlier processor streamed it."""
    compare_with_full_decode(TOK, text, [stop], max_tokens)


def test_same_as_full_decode_with_a_real_bpe_tokenizer(smollm2_dir):
    """A byte-level BPE with merges, whose tokens split characters: the incremental
    decode streams what decoding everything each step streamed."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = ("The capital of Germany is Berlin. 日本語のテキスト、中文文本 🦄🦄 emoji 👩‍👩‍👧 and "
            "accents: café, naïve, Ångström.\n  Indented  code: def f(x): return x ** 2\n") * 3
    compare_with_full_decode(tok, text, [], 10_000)
    compare_with_full_decode(tok, text, ["Ångström.\n  Indented"], 10_000)
    compare_with_full_decode(tok, text, ["🦄 emoji", "naïve,"], 10_000)
