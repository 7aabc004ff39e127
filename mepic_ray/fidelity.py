"""How close a reuse mode's next-token distributions are to full recompute's, on the
same answer: full answers greedily, then each engine reads that answer teacher-forced,
and the distributions are compared position by position. Free-running answers part at
the first differing token; forcing compares them on one common continuation. F1 from a
small model moves a lot per answer; these figures do not.

* ``first_token``: both rank the same token first at the answer's first position (the
  figure that catches "answers with an immediate end of sequence");
* ``top1``: the same, averaged over the answer's positions;
* ``kl``: KL(full || mode) in nats, averaged over the answer's positions.

The engine is stepped by hand, with nothing else in flight; each sampled token is
replaced by the forced one before the next step, which is when its K/V is computed,
so the forcing goes exactly through the engine's own prefill and decode paths.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from mepic_ray.sampling_params import SamplingParams

_ids = itertools.count()


@dataclass
class Fidelity:
    first_token: float
    top1: float
    kl: float


def _drive(engine, req, forced: list[int] | None) -> tuple[list[int], torch.Tensor]:
    rid = req.request_id
    if engine.has_unfinished():
        raise RuntimeError("teacher forcing needs an engine with nothing else in flight")
    engine.prefetch(req)
    engine.enqueue(req)
    rows = []
    while True:
        if not engine.has_unfinished():
            raise RuntimeError(f"request {rid} left the engine without finishing")
        out = next((o for o in engine.step() if o.request_id == rid), None)
        if out is None:
            continue        # nothing of it ran this step (waiting for blocks)
        if out.error:
            raise RuntimeError(f"request {rid} failed: {out.error}")
        if engine.last_logits.shape[0] != 1:
            raise RuntimeError("another request shares the step: the logits row would be ambiguous")
        rows.append(torch.log_softmax(engine.last_logits[0].float(), dim=-1).cpu())
        if forced is not None and len(rows) < len(forced):
            req.output_ids[-1] = req.token_ids[-1] = forced[len(rows) - 1]
        if out.finished:
            return list(forced or req.output_ids), torch.stack(rows)


def greedy_answer(engine, prompt, max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The greedy answer (up to ``max_tokens``, an end-of-sequence token kept as its last
    position) and its log-probabilities [len, vocab]."""
    req = engine.make_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), f"fid-{next(_ids)}")
    return _drive(engine, req, None)


def teacher_forced_logprobs(engine, prompt, answer: list[int]) -> torch.Tensor:
    """[len(answer), vocab]: row i is the next-token distribution after the prompt and
    ``answer[:i]``."""
    if not answer:
        raise ValueError("an empty answer has no positions to compare")
    params = SamplingParams(max_tokens=len(answer), temperature=0, ignore_eos=True)
    req = engine.make_request(prompt, params, f"fid-{next(_ids)}")
    if req.params.max_tokens != len(answer):
        raise RuntimeError(f"the pool leaves room for {req.params.max_tokens} of {len(answer)} forced tokens")
    return _drive(engine, req, answer)[1]


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Per position, KL(ref || got) in nats and whether the argmaxes agree, from two
    [len, vocab] log-probability tensors; and their summary."""
    kl = (ref.exp() * (ref - got)).sum(-1).clamp_min(0.0)
    agree = ref.argmax(-1) == got.argmax(-1)
    return {"kl": kl.tolist(), "top1": agree.tolist(), "first_token": bool(agree[0]),
            "mean_kl": kl.mean().item(), "top1_rate": agree.float().mean().item()}


def summary(comparisons: list[dict]) -> Fidelity:
    """Means over requests (each request's positions averaged first)."""
    n = len(comparisons)
    return Fidelity(sum(c["first_token"] for c in comparisons) / n, sum(c["top1_rate"] for c in comparisons) / n,
                    sum(c["mean_kl"] for c in comparisons) / n)
