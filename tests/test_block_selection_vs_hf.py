"""MEPIC's block-granular selective recompute (``block_ratio``) against a reference built
from transformers' own model.

Spec the reference implements: of a request's shared chunk blocks (every block of a
chunk but its front-padded first one), the ``ceil(ratio * count)`` whose layer-1 keys
(before RoPE) deviate most, on average over their tokens, between the prompt computed
in full causal context and the chunk computed alone are recomputed in context, with the
first blocks; every other chunk token keeps its standalone KV. The engine's answer
must equal that, at the logit level, for new and reused chunks."""
import math

import pytest
import torch
from transformers import DynamicCache

from mepic_ray import LLM
from test_reuse_vs_hf import POWER, REQUESTS, TOL, additive, engine_prefill, move_keys, segments, tok  # noqa: F401

RATIO, CHECK_LAYER = 0.5, 1


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def layer_keys(hf, ids, layer):
    """Keys of ``layer`` before RoPE for tokens at positions 0..n-1, causal."""
    seen = {}
    handle = hf.model.layers[layer].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.setdefault("k", o))
    try:
        hf(torch.tensor([ids]), position_ids=torch.arange(len(ids))[None])
    finally:
        handle.remove()
    return seen["k"][0]


def first_block(n: int, block_size: int) -> set[int]:
    """The tokens of a front-padded chunk's first block."""
    return set(range(min(block_size - (-n % block_size), n)))


def oracle_recompute(hf, segs, block_size):
    """Per segment, the token indices computed in context."""
    ids = [t for _, s in segs for t in s]
    in_context = layer_keys(hf, ids, CHECK_LAYER)
    recompute, candidates, pos = [], [], 0
    for i, (is_chunk, s) in enumerate(segs):
        n = len(s)
        if not is_chunk:
            recompute.append(set(range(n)))
        else:
            recompute.append(first_block(n, block_size))
            first = len(recompute[-1])
            alone = layer_keys(hf, s, CHECK_LAYER)
            dev = (in_context[pos:pos + n] - alone).pow(2).sum(-1)
            for start in range(first, n, block_size):
                toks = range(start, min(start + block_size, n))
                candidates.append((dev[list(toks)].mean().item(), i, toks))
        pos += n
    chosen = sorted(candidates, key=lambda c: -c[0])[:math.ceil(RATIO * len(candidates))]
    for _, i, toks in chosen:
        recompute[i].update(toks)
    return recompute


@torch.no_grad()
def reference(hf, segs, recompute):
    """Standalone KV of every chunk token not in ``recompute`` sits in the cache at its
    request position; everything else runs in one forward on top of it."""
    layers = hf.config.num_hidden_layers
    past_k, past_v, past_pos = [[] for _ in range(layers)], [[] for _ in range(layers)], []
    new_ids, new_pos, pos = [], [], 0
    for (is_chunk, s), keep_new in zip(segs, recompute):
        n = len(s)
        new = sorted(keep_new)
        new_ids += [s[j] for j in new]
        new_pos += [pos + j for j in new]
        old = [j for j in range(n) if j not in keep_new]
        if old:
            out = hf(torch.tensor([s]), position_ids=torch.arange(n)[None], use_cache=True)
            for li, layer in enumerate(out.cache.layers):
                past_k[li].append(move_keys(hf, layer.keys[:, :, old], pos))
                past_v[li].append(layer.values[:, :, old])
            past_pos += [pos + j for j in old]
        pos += n
    cache = DynamicCache()
    if past_pos:
        for li in range(layers):
            cache.update(torch.cat(past_k[li], 2), torch.cat(past_v[li], 2), li)
    key_pos, q_pos = torch.tensor(past_pos + new_pos), torch.tensor(new_pos)
    mask = additive(key_pos[None, :] <= q_pos[:, None])
    return hf(torch.tensor([new_ids]), position_ids=q_pos[None], attention_mask=mask, cache=cache).logits[0, -1]


@pytest.mark.parametrize("block_size", [4, 8])
def test_block_selection_matches_reference(tiny_model_dir, tiny_hf_model, tok, block_size):
    hf = tiny_hf_model
    llm = LLM(tiny_model_dir, mode="mepic", num_blocks=256, block_size=block_size,
              mode_options={"block_ratio": RATIO, "check_layer": CHECK_LAYER})
    powered = 0
    for prompt in REQUESTS:
        segs = segments(tok, prompt)
        recompute = oracle_recompute(hf, segs, block_size)
        got, out = engine_prefill(llm, prompt)
        torch.testing.assert_close(got, reference(hf, segs, recompute), **TOL, msg=lambda m: f"{prompt}: {m}")
        chunk_tokens = sum(len(keep) for (is_chunk, _), keep in zip(segs, recompute) if is_chunk)
        assert out.stats.recomputed_tokens == chunk_tokens, prompt
        # Power: recomputing only the first blocks (plain MEPIC), or the same number of
        # other blocks, must give other logits wherever a chunk has something before it.
        first_only = [first_block(len(s), block_size) if c else keep for (c, s), keep in zip(segs, recompute)]
        if any(c and i > 0 and keep != first for i, ((c, _), keep, first) in enumerate(zip(segs, recompute, first_only))):
            assert (got - reference(hf, segs, first_only)).abs().max().item() > POWER, prompt
            powered += 1
    assert powered >= 3, "too few requests where the selection matters"
