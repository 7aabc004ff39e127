"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

import torch

from mepic_ray.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].float().cpu() / p.temperature   # per-request generators live on the CPU
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token once the mass before it already reaches top_p; the best one always stays.
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            drop[0] = False   # a top_p below float32's smallest value would otherwise drop everything
            row = row.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out


Logprob = tuple[float, list[tuple[int, float]]]     # the sampled token's, and the top alternatives


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[Logprob | None]:
    """Log-probabilities under the model's own distribution, before temperature and
    top-k/top-p (what OpenAI and vLLM report), for the requests that asked."""
    out: list[Logprob | None] = [None] * len(tokens)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1).cpu()
    for j, i in enumerate(rows):
        top = lp[j].topk(params[i].logprobs)
        out[i] = (float(lp[j, tokens[i]]), list(zip(top.indices.tolist(), top.values.tolist())))
    return out
