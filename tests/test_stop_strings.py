"""Stop strings and incremental detokenizing in the output processor, driven token by
token as the engine drives it, against a brute-force oracle computed from the whole
decoded text; the cost of a step against long stop strings and long outputs; and the
bounds on stop strings in SamplingParams and the HTTP parser."""
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import byte_tokenizer
from mepic_ray.core.request import RequestStats
from mepic_ray.output_processor import OutputProcessor
from mepic_ray.sampling_params import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                                       SamplingParams, SamplingParamsError)

TOK = byte_tokenizer()
EOS = TOK.eos_token_id
MAX_MODEL_LEN = 10_000


@dataclass(eq=False)
class FakeRequest:
    """The attributes OutputProcessor.process reads and writes on a core Request."""
    params: SamplingParams
    request_id: str = "r"
    output_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    prompt_slots: int = 3

    @property
    def num_slots(self) -> int:
        return self.prompt_slots + len(self.output_ids)


def drive(processor, params, ids, request_id="r"):
    """Feed ``ids`` one at a time until the request finishes. Returns the request, the
    outputs, and for each step the number of tokens fed."""
    req = FakeRequest(params, request_id)
    outs = []
    for t in ids:
        req.output_ids.append(t)
        outs.append(processor.process(req))
        if outs[-1].finished:
            break
    return req, outs


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
        return _byte_ids(p)
    return TOK.encode(p, add_special_tokens=False)


def _byte_ids(b: bytes) -> list[int]:
    """The byte tokenizer's ids of raw bytes (which need not be valid UTF-8): byte x is the
    token of its character in GPT-2's byte-to-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    return [TOK.convert_tokens_to_ids(table[x]) for x in b]


def test_byte_ids_decode_back():
    for b in (b"a\x80b", "你🦄".encode(), b"\xff\xe4\xbd"):
        assert decoded(_byte_ids(b)) == b.decode("utf-8", "replace")
    assert decoded(_byte_ids("你".encode())[:2]) == "\ufffd"       # a split character shows as U+FFFD


stop_texts = st.lists(st.sampled_from(["a", "b", "é", "你", "🦄", "\ufffd", " "]), min_size=1, max_size=4).map("".join)
pieces = st.lists(st.sampled_from(PIECES) | st.sampled_from(RAW) | st.just("EOS"), max_size=24)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=pieces, stops=st.lists(stop_texts, max_size=4), max_tokens=st.integers(1, 40),
       ignore_eos=st.booleans(), stop_token=st.booleans())
def test_stop_strings_against_brute_force(parts, stops, max_tokens, ignore_eos, stop_token):
    ids = [t for p in parts for t in encode_piece(p)] + _byte_ids(b"z" * 40)    # enough to reach max_tokens
    stop_token_ids = (_byte_ids(b"b")[0],) if stop_token else ()
    check_against_oracle(ids, stops, max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids)


def test_hand_picked_cases():
    ids = TOK.encode("hello world, hello there", add_special_tokens=False)
    outs = check_against_oracle(ids, ["lo t"], 100)
    assert outs[-1].text == "hello world, hel" and outs[-1].finish_reason == "stop"
    # Overlapping stop strings: the one that ends first wins, whatever their order.
    for stops in (["world, hello", "o w"], ["o w", "world, hello"]):
        assert check_against_oracle(ids, stops, 100)[-1].text == "hell"
    # A stop string split across the bytes of a character, and one made of a split character.
    ids = _byte_ids("ab你好🦄cd".encode())
    assert check_against_oracle(ids, ["好🦄c"], 100)[-1].text == "ab你"
    assert check_against_oracle(ids, ["🦄"], 100)[-1].text == "ab你好"
    # A stop string never matches the U+FFFD standing for a character still arriving
    # (the full-decode processor stopped on the first byte of 你 here, answering "").
    assert check_against_oracle(_byte_ids("你x".encode()), ["\ufffd"], 10)[-1].text == "你x"
    # Nothing of a character is streamed before all its bytes are in.
    outs = check_against_oracle(ids, [], 100)
    assert [o.delta_text for o in outs[:5]] == ["a", "b", "", "", "你"]
    # Invalid bytes stay U+FFFD; held while they may still be completed, streamed after.
    outs = check_against_oracle(_byte_ids(b"x\xe4\xbdy\xff"), ["\ufffdy"], 100)
    assert outs[-1].text == "x" and outs[-1].finish_reason == "stop"
    outs = check_against_oracle(_byte_ids(b"x\xe4\xbd"), [], 3)
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


# --- cost: work per step, not seconds ---
class CountingStr(str):
    """A stop string that counts the characters read out of it (indexing or slicing)."""
    chars = 0

    def __getitem__(self, key):
        r = str.__getitem__(self, key)
        CountingStr.chars += len(r)
        return r


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.tokens = tok, 0

    def decode(self, ids, **kw):
        self.tokens += len(ids)
        return self.tok.decode(ids, **kw)


@contextmanager
def time_limit(seconds):
    def fail(*_):
        raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("stop", ["a" * 100_000, "a" * 99_999 + "b", "ab" * 50_000])
def test_long_stop_string_costs_what_the_text_costs(stop):
    """Four tokens against a 100k-character stop string (longer than the bound, set past
    the validation: the processor itself must not care) read a few characters of it, not
    the quadratic ~2e10 the naive hold-back check did."""
    params = SamplingParams(max_tokens=4)
    params.stop = [CountingStr(stop)]
    CountingStr.chars = 0
    with time_limit(20):
        req, outs = drive(OutputProcessor(TOK, {EOS}, MAX_MODEL_LEN), params, _byte_ids(b"aaaa"))
    assert outs[-1].finish_reason == "length" and outs[-1].text == "aaaa"
    if stop.startswith("aaaa"):
        assert [o.text for o in outs[:-1]] == ["", "", ""]      # all of it may still become the stop string
    assert CountingStr.chars <= 64, CountingStr.chars


def test_many_tokens_many_stop_strings_cost_is_linear():
    """A long output against the most and longest stop strings allowed, every one a
    partial match all along: characters read from the stop strings grow linearly with
    the text (O(text x stop strings)), and each step decodes a few tokens, not all."""
    n = 2000
    stops = [CountingStr("a" * (MAX_STOP_STRING_CHARS - 1) + chr(ord("b") + i)) for i in range(MAX_STOP_STRINGS)]
    params = SamplingParams(max_tokens=n, stop=stops)
    tok = CountingTokenizer(TOK)
    CountingStr.chars = 0
    with time_limit(30):
        req, outs = drive(OutputProcessor(tok, {EOS}, MAX_MODEL_LEN), params, _byte_ids(b"a" * n))
    assert outs[-1].finish_reason == "length" and outs[-1].text == "a" * n
    i = n - 100
    assert len(outs[i].text) == i + 1 - (MAX_STOP_STRING_CHARS - 1)    # the hold-back, no more
    # KMP: about 3 reads per character per stop string, and 2 per character of the stop
    # strings for their failure functions (the naive check: ~1e10).
    assert CountingStr.chars <= 4 * n * MAX_STOP_STRINGS + 3 * sum(map(len, stops)), CountingStr.chars
    assert tok.tokens <= 4 * n, tok.tokens      # decoding everything each step: n * n / 2


def test_megabyte_stop_string_within_a_wall_bound():
    """The reported case, 1 MB stop string and max_tokens 4: it took about a minute."""
    params = SamplingParams(max_tokens=4)
    params.stop = ["x" * 2**20]
    with time_limit(2):
        req, outs = drive(OutputProcessor(TOK, {EOS}, MAX_MODEL_LEN), params, _byte_ids(b"xxxx"))
    assert outs[-1].text == "xxxx" and outs[-1].finish_reason == "length"


def test_state_of_aborted_requests_is_dropped():
    """The engine aborts a request without a finishing step: its state goes with it."""
    import gc
    processor = OutputProcessor(TOK, {EOS}, MAX_MODEL_LEN)
    params = SamplingParams(max_tokens=100, stop=["zz"])
    req = FakeRequest(params, "abort-me")
    for t in _byte_ids(b"abc"):
        req.output_ids.append(t)
        assert not processor.process(req).finished
    assert processor.active() == 1
    del req
    gc.collect()
    assert processor.active() == 0
    # A new request under a live one's id starts afresh.
    a = FakeRequest(params, "same")
    a.output_ids.append(_byte_ids(b"q")[0])
    processor.process(a)
    b = FakeRequest(params, "same")
    b.output_ids.append(_byte_ids(b"r")[0])
    assert processor.process(b).text == "r"


# --- bounds ---
def test_stop_bounds_in_sampling_params():
    SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)      # the most allowed
    with pytest.raises(SamplingParamsError, match=f"at most {MAX_STOP_STRINGS}") as e:
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))
    assert e.value.param == "stop" and isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRING_CHARS} characters"):
        SamplingParams(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRING_CHARS} characters"):
        SamplingParams(stop="x" * 2**20)
    with pytest.raises(ValueError, match="non-empty"):
        SamplingParams(stop=["a", ""])
    SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    with pytest.raises(SamplingParamsError, match=f"at most {MAX_STOP_TOKEN_IDS}") as e:
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    assert e.value.param == "stop_token_ids"


@pytest.mark.parametrize("stop", [["x" * (MAX_STOP_STRING_CHARS + 1)], "y" * 2**20, ["s"] * (MAX_STOP_STRINGS + 1),
                                  ["ok", "\ud800"]], ids=["too_long", "megabyte", "too_many", "lone_surrogate"])
def test_stop_bounds_in_the_http_parser(stop):
    from deployments.protocol import ApiError, parse_chat, parse_completion
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": "q", "stop": stop}, "mepic", " # # ", TOK)
    assert e.value.status == 400 and e.value.param == "stop", e.value.message
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": [{"role": "user", "content": "q"}], "stop": stop}, "mepic", " # # ", TOK)
    assert e.value.status == 400 and e.value.param == "stop"


def test_http_parser_accepts_the_bound_and_names_other_params():
    from deployments.protocol import ApiError, parse_completion
    parse_completion({"prompt": "q", "stop": ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS}, "mepic", " # # ", TOK)
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": "q", "temperature": -1}, "mepic", " # # ", TOK)
    assert e.value.status == 400 and e.value.param == "temperature"


def test_schema_states_the_stop_bounds():
    from deployments.schema import CHAT_SCHEMA, COMPLETION_SCHEMA
    for schema in (COMPLETION_SCHEMA, CHAT_SCHEMA):
        stop, null = schema["properties"]["stop"]["anyOf"]     # null: not given
        assert null == {"type": "null"}
        one, many = stop["oneOf"]
        assert one["maxLength"] == many["items"]["maxLength"] == MAX_STOP_STRING_CHARS
        assert many["maxItems"] == MAX_STOP_STRINGS
