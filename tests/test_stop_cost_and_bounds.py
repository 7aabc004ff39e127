"""What a step of the output processor costs against long stop strings and long outputs
(characters read and tokens decoded, counted, not seconds, but under a wall bound that
the old quadratic checks overran), that aborted requests leave no state, and the bounds
on stop strings in SamplingParams, the HTTP parser and the API schema."""
import signal
from contextlib import contextmanager

import pytest

from mepic_ray.output_processor import OutputProcessor
from mepic_ray.sampling_params import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                                       SamplingParams, SamplingParamsError)
from stop_helpers import EOS, MAX_MODEL_LEN, TOK, FakeRequest, byte_ids, drive


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
        req, outs = drive(OutputProcessor(TOK, {EOS}, MAX_MODEL_LEN), params, byte_ids(b"aaaa"))
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
        req, outs = drive(OutputProcessor(tok, {EOS}, MAX_MODEL_LEN), params, byte_ids(b"a" * n))
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
        req, outs = drive(OutputProcessor(TOK, {EOS}, MAX_MODEL_LEN), params, byte_ids(b"xxxx"))
    assert outs[-1].text == "xxxx" and outs[-1].finish_reason == "length"


def test_state_of_aborted_requests_is_dropped():
    """The engine aborts a request without a finishing step: its state goes with it."""
    import gc
    processor = OutputProcessor(TOK, {EOS}, MAX_MODEL_LEN)
    params = SamplingParams(max_tokens=100, stop=["zz"])
    req = FakeRequest(params, "abort-me")
    for t in byte_ids(b"abc"):
        req.output_ids.append(t)
        assert not processor.process(req).finished
    assert processor.active() == 1
    del req
    gc.collect()
    assert processor.active() == 0
    # A new request under a live one's id starts afresh.
    a = FakeRequest(params, "same")
    a.output_ids.append(byte_ids(b"q")[0])
    processor.process(a)
    b = FakeRequest(params, "same")
    b.output_ids.append(byte_ids(b"r")[0])
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
