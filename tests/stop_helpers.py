"""What the output processor's tests share: the byte tokenizer, a stand-in for the core
request with just what ``OutputProcessor.process`` touches, and a driver that feeds it
tokens one step at a time as the engine does."""
from dataclasses import dataclass, field

from conftest import byte_tokenizer
from mepic_ray.core.request import RequestStats
from mepic_ray.sampling_params import SamplingParams

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


def byte_ids(b: bytes) -> list[int]:
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
