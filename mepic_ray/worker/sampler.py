"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, for the whole
batch at once.

A draw is ``argmax(probs / E)`` with ``E`` i.i.d. Exp(1): the same draw
``torch.multinomial(probs, 1)`` makes on the CPU from the same generator state, so a
seeded request samples the same tokens whether it is batched with others or not. Only
the exponential noise is drawn per request (its generator is its own); masking,
softmax and the choice run on the batch.
"""
from __future__ import annotations

import torch

from mepic_ray.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    x = logits[rows].float().cpu()      # per-request generators live on the CPU
    x = x / torch.tensor([[params[i].temperature] for i in rows])
    x = _top_k(x, [params[i].top_k for i in rows])
    x = _top_p(x, [params[i].top_p for i in rows])
    probs = torch.softmax(x, dim=-1)
    if torch.isnan(probs).any():
        raise ValueError("sampling: a row of logits has no finite value")
    noise = torch.empty_like(probs)
    unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
    for j, i in enumerate(rows):
        if generators[i] is not None:
            noise[j].exponential_(1, generator=generators[i])
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(1)
    for j, tok in zip(rows, (probs / noise).argmax(dim=-1).tolist()):
        out[j] = tok
    return out


def _top_k(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Keep each row's ``k`` largest logits (ties with the k-th kept); 0 or at least the
    vocabulary keeps all."""
    vocab = x.shape[1]
    apply = [0 < k < vocab for k in ks]
    if not any(apply):
        return x
    top = torch.topk(x, max(k for k, a in zip(ks, apply) if a), dim=-1).values
    kth = top.gather(1, torch.tensor([[k - 1 if a else 0] for k, a in zip(ks, apply)]))
    return x.masked_fill(torch.tensor(apply).unsqueeze(1) & (x < kth), float("-inf"))


def _top_p(x: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Drop a token once the probability mass before it already reaches ``top_p``;
    the best one always stays. Rows at 1.0 are left whole (their cumulative sum may
    round past 1 before the last token)."""
    sel = [j for j, p in enumerate(ps) if p < 1.0]
    if not sel:
        return x
    part = x[sel]
    sorted_logits, order = torch.sort(part, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= torch.tensor([[ps[j]] for j in sel])
    drop[:, 0] = False   # a top_p below float32's smallest value would otherwise drop everything
    x = x.clone()
    x[sel] = part.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return x


Logprob = tuple[float, list[tuple[int, float]]]     # the sampled token's, and the top alternatives


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[Logprob | None]:
    """Log-probabilities under the model's own distribution, before temperature and
    top-k/top-p (what OpenAI and vLLM report), for the requests that asked."""
    out: list[Logprob | None] = [None] * len(tokens)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1).cpu()
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows])).flatten().tolist()
    widest = max(params[i].logprobs for i in rows)
    top = lp.topk(widest, dim=-1) if widest else None
    for j, i in enumerate(rows):
        n = params[i].logprobs
        alts = list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist())) if n else []
        out[i] = (chosen[j], alts)
    return out
