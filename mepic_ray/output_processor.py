"""Turns each sampled token into the request's text: detokenize, apply stop tokens and
stop strings, hold back what may still change, and decide whether the request is done.

Everything here runs on the engine thread after every token of every request, so its
cost per token must not grow with anything a client picks (the length of the output,
the number or length of the stop strings):

* Detokenizing is incremental, as in vLLM's and Hugging Face's streamers: each step
  decodes only a short window of tokens (from ``prefix_offset``, whose text is already
  known, to the end) and takes the part after the known text. Decoding from a few tokens
  back, not from the new token alone, keeps tokenizers that drop a word's leading space
  at the start of a decode right; a window whose text ends with U+FFFD (the first bytes
  of a character whose other bytes come with later tokens) is not advanced, and only its
  part before the trailing U+FFFD is taken, until the character is complete.
* Stop strings are matched with one Knuth-Morris-Pratt automaton each, fed only the
  characters new this step. An automaton's state, the longest suffix of the text that
  is a prefix of its stop string, is also exactly how much text must be held back from
  the stream: so the hold-back is at most the longest stop string's length minus one.
  Each step costs O(new characters x stop strings), amortized, and a request's total is
  O(text length x stop strings) however long the stop strings are (their failure
  functions are computed only as far as the text has matched into them).

When a step completes several stop strings, the text is cut at the one that ends first
(of those, the one that starts first): the answer is then the same whichever way the
text was split into tokens, as if the characters had come one at a time.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from mepic_ray.core.request import Request, RequestStats

_FFFD = "\ufffd"


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    delta_text: str
    delta_token_ids: list[int]
    stats: RequestStats
    error: str | None = None
    delta_logprobs: list | None = None    # sampler.Logprob of this step's token, when asked
    logprobs: list | None = None          # all of them, on the final output


class StopMatcher:
    """Watches a growing text for any of a set of stop strings, one character at a time:
    a Knuth-Morris-Pratt automaton per stop string. Each one's failure function is
    computed lazily, only as far as the automaton has got into its string, so the work
    is bounded by the characters fed, whatever the stop strings' lengths."""

    __slots__ = ("stops", "fails", "state")

    def __init__(self, stops: list[str]):
        self.stops = tuple(stops)
        self.fails = tuple([0] for _ in self.stops)   # pi[i]: longest proper border of s[:i + 1]
        self.state = [0] * len(self.stops)            # longest suffix of the text that is a prefix of s

    @staticmethod
    def _extend(s: str, pi: list[int], n: int) -> None:
        """Compute the failure function of ``s`` up to index ``n - 1``."""
        k = pi[-1]
        for i in range(len(pi), n):
            c = s[i]
            while k and s[k] != c:
                k = pi[k - 1]
            if s[k] == c:
                k += 1
            pi.append(k)

    def feed(self, text: str, start: int) -> int | None:
        """Feed ``text[start:]`` (the text before it was fed earlier). Returns where the text
        must be cut, the start of the first stop string to be completed, or None."""
        stops, fails, state = self.stops, self.fails, self.state
        for i in range(start, len(text)):
            c = text[i]
            cut = None
            for j, s in enumerate(stops):
                k, pi = state[j], fails[j]
                while k and s[k] != c:
                    k = pi[k - 1]
                if s[k] == c:
                    k += 1
                    if k == len(s):
                        if cut is None or i + 1 - k < cut:
                            cut = i + 1 - k
                        if len(pi) < k:
                            self._extend(s, pi, k)
                        k = pi[k - 1]
                    elif len(pi) < k:     # a later mismatch may fall back from here
                        self._extend(s, pi, k)
                state[j] = k
            if cut is not None:
                return cut
        return None

    @property
    def hold(self) -> int:
        """How many characters at the end of the text may still become a stop string:
        less than the longest stop string."""
        return max(self.state)


class _RequestState:
    """What the processor keeps for a request between its tokens."""

    __slots__ = ("owner", "finalizer", "prefix_offset", "read_offset", "prefix_text", "taken", "text",
                 "matcher", "stop_ids")

    def __init__(self, req):
        self.owner = self.finalizer = None
        self.prefix_offset = 0   # the decode window starts here
        self.read_offset = 0     # ... and its tokens before this have text prefix_text, already in ``text``
        self.prefix_text = ""
        self.taken = 0           # characters after prefix_text already taken into ``text`` (window not advanced)
        self.text = ""           # the decoded text so far, but for a trailing U+FFFD
        p = req.params
        self.matcher = StopMatcher(p.stop) if p.stop else None
        self.stop_ids = frozenset(p.stop_token_ids)


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len
        self._states: dict[str, _RequestState] = {}

    def _state(self, req) -> _RequestState:
        st = self._states.get(req.request_id)
        if st is not None and (st.owner is None or st.owner() is req):
            return st
        st = self._states[req.request_id] = _RequestState(req)
        try:
            st.owner = weakref.ref(req)
        except TypeError:   # a stand-in that takes no weak references: trust the id
            return st
        # A request aborted by the engine never comes back here: drop its state with it.
        st.finalizer = weakref.finalize(req, self._forget, req.request_id, st)
        st.finalizer.atexit = False
        return st

    def drop(self, request_id: str) -> None:
        """Forget a request that will get no more tokens (aborted): optional, its state also
        goes when the request is garbage-collected."""
        st = self._states.get(request_id)
        if st is not None:
            self._forget(request_id, st)

    def _forget(self, request_id: str, st: _RequestState) -> None:
        if self._states.get(request_id) is st:
            del self._states[request_id]
            if st.finalizer is not None:
                st.finalizer.detach()

    def _decode(self, st: _RequestState, ids: list[int], final: bool) -> str:
        """The text the tokens since the last call add; a trailing U+FFFD is kept back
        unless ``final``."""
        decode = self.tokenizer.decode
        text = decode(ids[st.prefix_offset:], skip_special_tokens=True)
        known = len(st.prefix_text) + st.taken
        if not final and text.endswith(_FFFD):
            new = text.rstrip(_FFFD)[known:]
            st.taken += len(new)
            return new
        new = text[known:]
        if len(ids) > st.read_offset:
            st.prefix_offset, st.read_offset = st.read_offset, len(ids)
            st.prefix_text = decode(ids[st.prefix_offset:st.read_offset], skip_special_tokens=True)
            st.taken = 0
        return new

    def replay(self, req: Request) -> None:
        """Bring a resumed request's state to where its first run was after the same
        tokens (text, hold-back, stop-string automata), so that what follows is streamed
        as if the run had never been cut. Raises ValueError if those tokens already
        finish the answer."""
        resumed, req.output_ids = req.output_ids, []
        for tok in resumed:
            req.output_ids.append(tok)
            if self.process(req).finished:
                raise ValueError("the resumed tokens already end the answer")

    def active(self) -> int:
        """Requests whose state is kept (tests, debugging)."""
        return len(self._states)

    def process(self, req: Request) -> RequestOutput:
        """After ``req`` got a new token: set ``req.text`` and ``req.finish_reason``."""
        p, ids = req.params, req.output_ids
        tok = ids[-1]
        st = self._state(req)
        prev_text = req.text
        if not p.ignore_eos and tok in self.eos_ids or tok in st.stop_ids:
            req.finish_reason = "stop"
        ending = req.finish_reason is not None or len(ids) >= p.max_tokens or req.num_slots >= self.max_model_len
        start = len(st.text)
        st.text += self._decode(st, ids, final=ending)
        cut = st.matcher.feed(st.text, start) if st.matcher is not None else None
        if cut is not None:
            st.text, req.finish_reason = st.text[:cut], "stop"
        elif ending and req.finish_reason is None:
            req.finish_reason = "length"
        finished = req.finish_reason is not None
        text = st.text
        if not finished and st.matcher is not None and (hold := st.matcher.hold):
            # A tail that may still grow into a stop string: what is streamed must stay a
            # prefix of the final text.
            text = text[:len(text) - hold]
        if finished:
            self._forget(req.request_id, st)
        if finished or text.startswith(prev_text):
            req.text = text
        delta = req.text[len(prev_text):] if req.text.startswith(prev_text) else ""
        asked = p.logprobs is not None
        return RequestOutput(req.request_id, req.text, list(ids), finished, req.finish_reason,
                             delta, [tok], req.stats, delta_logprobs=req.logprobs[-1:] if asked else None,
                             logprobs=list(req.logprobs) if asked and finished else None)
