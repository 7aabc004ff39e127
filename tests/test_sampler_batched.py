"""The batched sampler against the per-request one it replaced: the same tokens for
every mix of greedy and sampled rows, temperatures, top-k (ties, 1, the vocabulary and
beyond) and top-p (tiny, middling, 1.0), from the same per-request generators, and
those generators left in the same state (so the next step agrees too).

Reference: the former sampler, one row at a time, drawing with ``torch.multinomial``."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mepic_ray.sampling_params import SamplingParams
from mepic_ray.worker.sampler import sample, token_logprobs


def reference_sample(logits, params, generators):
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].float().cpu() / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            drop[0] = False
            row = row.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out


row_params = st.builds(
    lambda t, k, p, seed: (SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed), seed),
    st.sampled_from([0.0, 0.0, 0.3, 0.7, 1.0, 1.9]),
    st.sampled_from([0, 1, 2, 7, 200, 256, 300]),
    st.sampled_from([1.0, 1.0, 0.95, 0.6, 0.1, 1e-30, 1e-46]),    # 1e-46 is 0 in float32
    st.one_of(st.none(), st.integers(0, 2**40)))


@settings(max_examples=150, deadline=None)
@given(st.lists(row_params, min_size=1, max_size=9), st.integers(0, 2**31 - 1), st.booleans())
def test_batched_sampling_draws_what_one_row_at_a_time_drew(rows, data_seed, ties):
    vocab = 256
    g = torch.Generator().manual_seed(data_seed)
    logits = torch.randn(len(rows), vocab, generator=g) * 4
    if ties:     # coarse logits: many equal values around the k-th and the top-p cut
        logits = logits.round()
    params = [p for p, _ in rows]
    gens_a = [torch.Generator().manual_seed(s) if s is not None else None for _, s in rows]
    gens_b = [torch.Generator().manual_seed(s) if s is not None else None for _, s in rows]
    seeded = [i for i, (_, s) in enumerate(rows) if s is not None or params[i].greedy]
    got, want = sample(logits, params, gens_a), reference_sample(logits, params, gens_b)
    assert [got[i] for i in seeded] == [want[i] for i in seeded]
    for a, b in zip(gens_a, gens_b):      # the next draw from each generator agrees
        if a is not None:
            assert torch.rand(1, generator=a).item() == torch.rand(1, generator=b).item()
    for i, p in enumerate(params):      # unseeded rows: a token the row's filters allow
        if i not in seeded:
            allowed = torch.isfinite(_filtered(logits[i], p))
            assert allowed[got[i]]


def _filtered(row, p):
    row = row / p.temperature
    if 0 < p.top_k < row.shape[0]:
        row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        s, order = torch.sort(row, descending=True)
        pr = torch.softmax(s, -1)
        drop = (pr.cumsum(-1) - pr) >= p.top_p
        drop[0] = False
        row = row.index_fill(0, order[drop], float("-inf"))
    return row


def test_full_vocabulary_rows_agree_over_many_steps():
    """SmolLM2's vocabulary size, a batch of 6 seeded rows, 20 steps in a row."""
    vocab, g = 49152, torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s)
              for t, k, p, s in [(0.8, 0, 0.9, 1), (1.0, 50, 1.0, 2), (0.5, 0, 1.0, 3), (1.3, 40, 0.8, 4),
                                 (0.0, 0, 1.0, None), (0.7, 0, 0.3, 6)]]
    gens_a = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    gens_b = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    for _ in range(20):
        logits = torch.randn(len(params), vocab, generator=g) * 3
        assert sample(logits, params, gens_a) == reference_sample(logits, params, gens_b)


def test_a_row_without_a_finite_logit_is_an_error():
    logits = torch.full((2, 8), float("-inf"))
    logits[0, 3] = 1.0
    with pytest.raises(ValueError, match="finite"):
        sample(logits, [SamplingParams(temperature=1.0)] * 2, [None, None])


def test_logprobs_per_row_widths():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=g)
    params = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(logprobs=0)]
    tokens = [5, 7, 9]
    got = token_logprobs(logits, tokens, params)
    lp = torch.log_softmax(logits, -1)
    assert got[1] is None and got[2] == (pytest.approx(float(lp[2, 9])), [])
    want_top = sorted(range(40), key=lambda t: -float(lp[0, t]))[:3]
    assert got[0][0] == pytest.approx(float(lp[0, 5])) and [t for t, _ in got[0][1]] == want_top
