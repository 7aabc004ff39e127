"""Per-request sampling parameters, validated at construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Bounds on what a client may ask the engine to watch for after every token. Stop strings
# are matched incrementally (output_processor), so their cost per token no longer grows
# with their length, but each request still builds a matcher over all of them and the
# text held back from the stream can be as long as the longest one: 16 strings of at
# most 1024 characters (OpenAI allows 4 stop sequences; vLLM sets no limit). Stop token
# ids are looked up in a set; the bound only keeps the request itself small.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20          # alternatives per token, as OpenAI allows


class SamplingParamsError(ValueError):
    """A sampling parameter out of its range; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_stop(stop) -> list[str]:
    """``stop`` as a list, or SamplingParamsError: at most MAX_STOP_STRINGS non-empty
    strings of at most MAX_STOP_STRING_CHARS characters each. The count and lengths are
    checked before anything else looks at the strings."""
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise SamplingParamsError("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingParamsError(f"stop may hold at most {MAX_STOP_STRINGS} strings (MAX_STOP_STRINGS), "
                                  f"got {len(stop)}", "stop")
    if not all(isinstance(s, str) and s for s in stop):
        raise SamplingParamsError("stop must be a list of non-empty strings", "stop")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise SamplingParamsError(f"each stop string may be at most {MAX_STOP_STRING_CHARS} characters long "
                                  f"(MAX_STOP_STRING_CHARS), got one of {longest}", "stop")
    return list(stop)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0      # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)            # at most MAX_STOP_STRINGS of MAX_STOP_STRING_CHARS
    stop_token_ids: list[int] = field(default_factory=list)  # at most MAX_STOP_TOKEN_IDS
    ignore_eos: bool = False
    # Report each sampled token's log-probability and this many most likely alternatives
    # (None: no log-probabilities; at most 20, as OpenAI allows).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        def finite(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingParamsError(f"{name} must be a finite number, got {v!r}", name)
        finite("temperature", self.temperature)
        finite("top_p", self.top_p)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if self.temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise SamplingParamsError(f"top_k must be an integer >= -1, got {self.top_k!r}", "top_k")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise SamplingParamsError(f"seed must be an integer in [0, 2**63), got {self.seed!r}", "seed")
        self.stop = check_stop(self.stop)
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingParamsError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
                                      "logprobs")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise SamplingParamsError("stop_token_ids must be a list of non-negative integers", "stop_token_ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids "
                                      f"(MAX_STOP_TOKEN_IDS), got {len(self.stop_token_ids)}", "stop_token_ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids must be non-negative integers", "stop_token_ids")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        # As in vLLM, temperatures this small are greedy: dividing by them overflows to NaN.
        return self.temperature < 1e-5
