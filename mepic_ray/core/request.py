"""A request: its prompt layout, sampling parameters, output and accounting. Its KV
state (block table, held chunks, the prefill's remaining work) belongs to the KV
cache manager."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from mepic_ray.core.layout import Layout
from mepic_ray.hashing import PAD_TOKEN
from mepic_ray.sampling_params import SamplingParams
from mepic_ray.segments import Segment


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens whose KV was reused, not computed
    recomputed_tokens: int = 0    # reused chunk tokens recomputed in context
    compiled_tokens: int = 0      # chunk tokens computed standalone for this request
    computed_tokens: int = 0      # prompt tokens run through the model in context
    loaded_tokens: int = 0        # chunk tokens whose blocks were loaded from the object-store tier
    # Where each distinct chunk's blocks came from: this replica's pool, the store, or nowhere (compiled).
    chunks_pool: int = 0
    chunks_store: int = 0
    chunks_miss: int = 0
    resumed_tokens: int = 0       # answer tokens another replica streamed before it died, given as a forced prefix
    preemptions: int = 0          # times its pages were taken back (it resumed by recomputing them)
    prefill_steps: int = 0        # steps its prefills (the first, and any after a preemption) took part in
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finished_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival_s


@dataclass
class Request:
    request_id: str
    prompt: object
    params: SamplingParams
    segments: list[Segment]
    layout: Layout
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)    # one sampler.Logprob per output token, when asked
    # Chunk hash -> KV fetched from the object-store tier before the request was queued.
    fetched_kv: dict = field(default_factory=dict)
    finish_reason: str | None = None
    text: str = ""
    stats: RequestStats = field(default_factory=RequestStats)
    # The layout's last tokens are an answer already streamed (resumed after a replica
    # died): computed like prompt text, counted as output.
    num_resumed: int = 0

    def __post_init__(self) -> None:
        self.stats.arrival_s = time.perf_counter()
        self.stats.prompt_tokens = sum(1 for t in self.layout.token_ids if t != PAD_TOKEN) - self.num_resumed
        self.stats.resumed_tokens = self.num_resumed
        self.num_prompt_slots = len(self.layout.token_ids)
        self.token_ids = list(self.layout.token_ids)   # grows with decoded tokens
        self.positions = list(self.layout.positions)
        if self.num_resumed:
            self.output_ids = self.token_ids[-self.num_resumed:]

    @property
    def max_new_tokens(self) -> int:
        """Tokens still to be generated at most."""
        return self.params.max_tokens - self.num_resumed

    @property
    def num_slots(self) -> int:
        return len(self.token_ids)

    def append_token(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)
        self.positions.append(self.stats.prompt_tokens + len(self.output_ids) - 1)
