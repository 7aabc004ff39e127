"""When a replica uses the object-store tier, apart from how it talks to it (as
LMCache splits its storage backends from their policies): load a chunk only when
measured cheaper than compiling it, and stop asking a store that fails or hangs."""
from __future__ import annotations

import time


class CostModel:
    """Measured costs (EWMA): compiling per token vs loading per byte. Until both
    have been seen the tier is tried, so that it gets measured at all."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.compile_s_per_token: float | None = None
        # Fetch, decode and copy-in time over bytes; a fetch's fixed latency is folded in,
        # which makes small chunks look dear to load: the safe side (compiling is always correct).
        self.load_s_per_byte: float | None = None

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_compile(self, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self.compile_s_per_token = self._ewma(self.compile_s_per_token, seconds / tokens)

    def observe_load(self, seconds: float, nbytes: int) -> None:
        if nbytes > 0:
            self.load_s_per_byte = self._ewma(self.load_s_per_byte, seconds / nbytes)

    def load_is_cheaper(self, tokens: int, nbytes: int) -> bool:
        # The lookup is already paid when this is asked; only the fetch is compared.
        if self.compile_s_per_token is None or self.load_s_per_byte is None:
            return True
        return nbytes * self.load_s_per_byte < tokens * self.compile_s_per_token


class Breaker:
    """Open after a failed store call: callers skip the store until the backoff has
    passed (doubling per further failure, up to ``cap_s``); a success closes it."""

    def __init__(self, base_s: float, cap_s: float = 60.0):
        self.base_s, self.cap_s = base_s, cap_s
        self.backoff_s = 0.0
        self.open_until = 0.0

    def allow(self) -> bool:
        return time.monotonic() >= self.open_until

    def failure(self) -> None:
        now = time.monotonic()
        if now < self.open_until:    # calls already in flight when it opened add nothing
            return
        self.backoff_s = min(self.cap_s, 2 * self.backoff_s if self.backoff_s else self.base_s)
        self.open_until = now + self.backoff_s

    def success(self) -> None:
        self.backoff_s = self.open_until = 0.0
