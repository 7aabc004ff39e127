"""Chunk reuse (`naive`, `epic`, `mepic`) against a reference built only from
transformers' own model, at the logit level, for chunks of several blocks placed at
several offsets and in several orders on one engine, so later requests reuse pages.

Spec the reference implements: positions are contiguous over real tokens (engine
padding takes none); text attends causally to everything before it; a chunk's KV is
computed standalone; `epic` recomputes the first 16 tokens of each chunk in context,
`mepic` the real tokens of its (front-padded) first block, per layer, and with
`recompute_tokens: W` (`mepic-window`) at least W real tokens, in whole blocks."""
import copy

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

from mepic_ray import LLM, Chunk, SamplingParams

EPIC_K = 16
WINDOW = 10
TOL = dict(atol=1e-4, rtol=1e-5)
# A wrong reference must miss by this much, so the comparison can tell modes apart.
POWER = 1e-2

# The byte tokenizer gives one token per byte: 12, 19 and 45 tokens, i.e. 3/5/12 blocks
# at B=4, 2/3/6 at B=8, 1/2/3 at B=16; first blocks hold 4/3/1, 4/3/5 and 12/3/13 real
# tokens, so both a full and a partial first block occur, and epic's 16 falls inside
# C2 and C3 but covers all of C1.
C1 = "twelve bytes"
C2 = "nineteen bytes long"
C3 = "forty-five bytes of document text, in a chunk"
REQUESTS = [
    ["Context: ", Chunk(C1), " then ", Chunk(C2), " Q?"],
    ["A longer preamble here: ", Chunk(C2), " then ", Chunk(C1), " Q?"],    # other order and offset
    ["Offset shifted by more bytes: ", Chunk(C1), " then ", Chunk(C2), " Q?"],
    ["Pre ", Chunk(C3), Chunk(C1), " and ", Chunk(C2), "?"],                 # adjacent chunks
    [Chunk(C2), " x ", Chunk(C3), " end"],                                    # a chunk at position 0
    ["Seven: ", Chunk(C1), Chunk(C3), Chunk(C2)],                             # trailing chunk is text
    ["Twice ", Chunk(C3), " again ", Chunk(C3), " ?"],                        # one chunk twice
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def segments(tok, prompt):
    """[(is_chunk, ids)] as the spec tokenizes: text merged, a trailing chunk is text."""
    segs, text = [], ""
    for item in prompt:
        if isinstance(item, Chunk):
            if text:
                segs.append((False, tok.encode(text, add_special_tokens=False)))
                text = ""
            segs.append((True, tok.encode(item.text, add_special_tokens=False)))
        else:
            text += item
    if text:
        segs.append((False, tok.encode(text, add_special_tokens=False)))
    if segs[-1][0]:
        segs[-1] = (False, segs[-1][1])
    return segs


def recomputed(mode, n, block_size):
    """How many leading tokens of an n-token chunk are computed in context."""
    if mode == "naive":
        return 0
    if mode == "epic":
        return min(EPIC_K, n)
    count = n % block_size or block_size      # the real tokens of the front-padded first block
    while mode == "mepic-window" and count < min(WINDOW, n):
        count += block_size                   # ... and whole blocks after it
    return min(count, n)


def additive(allowed):
    # Additive float rather than boolean, so eager and sdpa attention read it alike.
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@torch.no_grad()
def mask_reference(hf, segs, isolate_chunks=True):
    """One forward over all tokens; chunk tokens see only their own chunk (naive)."""
    ids = [t for _, s in segs for t in s]
    owner = torch.tensor([i if c and isolate_chunks else -1 for i, (c, s) in enumerate(segs) for _ in s])
    n = len(ids)
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & ((owner[:, None] < 0) | (owner[:, None] == owner[None, :]))
    return hf(torch.tensor([ids]), position_ids=torch.arange(n)[None], attention_mask=additive(allowed)).logits[0, -1]


def move_keys(hf, k, offset):
    """HF caches K after RoPE: rotating by `offset` moves a key from p to p + offset."""
    cos, sin = hf.model.rotary_emb(k.new_zeros(1, k.shape[2], 1), torch.full((1, k.shape[2]), offset))
    return k * cos[:, None] + rotate_half(k) * sin[:, None]


@torch.no_grad()
def reuse_reference(hf, segs, n_recompute):
    """Standalone chunk KV moved to the request's positions sits in the cache; text and
    each chunk's first `n_recompute(n)` tokens run in one forward on top of it."""
    layers = hf.config.num_hidden_layers
    past_k, past_v, past_pos = [[] for _ in range(layers)], [[] for _ in range(layers)], []
    new_ids, new_pos, pos = [], [], 0
    for is_chunk, ids in segs:
        n = len(ids)
        r = n_recompute(n) if is_chunk else n
        new_ids += ids[:r]
        new_pos += range(pos, pos + r)
        if r < n:
            out = hf(torch.tensor([ids]), position_ids=torch.arange(n)[None], use_cache=True)
            for i, layer in enumerate(out.cache.layers):
                past_k[i].append(move_keys(hf, layer.keys[:, :, r:], pos))
                past_v[i].append(layer.values[:, :, r:])
            past_pos += range(pos + r, pos + n)
        pos += n
    cache = DynamicCache()
    if past_pos:
        for i in range(layers):
            cache.update(torch.cat(past_k[i], 2), torch.cat(past_v[i], 2), i)
    # Keys are [past, new] in the cache; order is irrelevant to attention, positions decide.
    key_pos, q_pos = torch.tensor(past_pos + new_pos), torch.tensor(new_pos)
    mask = additive(key_pos[None, :] <= q_pos[:, None]).to(hf.dtype)
    return hf(torch.tensor([new_ids]), position_ids=q_pos[None], attention_mask=mask, cache=cache).logits[0, -1]


def reference(hf, segs, mode, block_size):
    return reuse_reference(hf, segs, lambda n: recomputed(mode, n, block_size))


def engine_prefill(llm, prompt):
    eng = llm.engine
    rid = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    outs = []
    for _ in range(4):   # private copies compile in a step before the prefill overwrites them
        outs = [o for o in eng.step() if o.request_id == rid]
        if outs:
            break
    assert outs and outs[0].finished
    return eng.last_logits[0].clone(), outs[0]


def test_reference_self_consistency(tiny_hf_model, tok):
    """The reference's pieces agree with plain transformers where the answer is known."""
    hf = tiny_hf_model
    assert [len(tok.encode(c, add_special_tokens=False)) for c in (C1, C2, C3)] == [12, 19, 45]
    plain = segments(tok, ["No chunks in this prompt at all."])
    with torch.no_grad():
        base = hf(torch.tensor([plain[0][1]])).logits[0, -1]
    torch.testing.assert_close(reference(hf, plain, "mepic", 4), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mask_reference(hf, plain), base, atol=1e-5, rtol=1e-5)
    ids = tok.encode(C3, add_special_tokens=False)
    with torch.no_grad():
        at0 = hf(torch.tensor([ids]), position_ids=torch.arange(45)[None], use_cache=True).cache.layers[1].keys
        at37 = hf(torch.tensor([ids]), position_ids=torch.arange(37, 82)[None], use_cache=True).cache.layers[1].keys
    torch.testing.assert_close(move_keys(hf, at0, 37), at37, atol=1e-5, rtol=1e-5)
    for prompt in REQUESTS:
        segs = segments(tok, prompt)
        # Recomputing nothing is naive; recomputing everything is plain causal attention.
        torch.testing.assert_close(reuse_reference(hf, segs, lambda n: 0), mask_reference(hf, segs),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reuse_reference(hf, segs, lambda n: n),
                                   mask_reference(hf, segs, isolate_chunks=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 8, 16])
@pytest.mark.parametrize("mode", ["naive", "epic", "mepic", "mepic-window"])
def test_reuse_logits_match_reference(tiny_model_dir, tiny_hf_model, tok, mode, block_size):
    """Every request's last-position logits equal the spec's reference, whether its
    chunks are new or reused from earlier requests at other offsets and orders, and a
    neighbouring mode's reference is far off wherever that would differ."""
    hf = tiny_hf_model
    options = {"mode": "mepic", "mode_options": {"recompute_tokens": WINDOW}} if mode == "mepic-window" else {"mode": mode}
    llm = LLM(tiny_model_dir, num_blocks=256, block_size=block_size, **options)
    seen = set()
    for prompt in REQUESTS:
        segs = segments(tok, prompt)
        got, out = engine_prefill(llm, prompt)
        torch.testing.assert_close(got, reference(hf, segs, mode, block_size), **TOL, msg=lambda m: f"{prompt}: {m}")

        # Every chunk seen by an earlier request must come from cache, minus what is recomputed.
        chunks = [ids for is_chunk, ids in segs if is_chunk]
        reused = sum(len(c) - recomputed(mode, len(c), block_size) for c in chunks if tuple(c) in seen)
        if reused:
            assert out.stats.cached_tokens >= reused > 0, prompt
        seen.update(tuple(c) for c in chunks)

        # Power: naive must not pass as full attention, nor epic/mepic as naive (a skipped
        # recompute), in every request holding standalone KV that differs between them.
        kept = any(len(c) > recomputed(mode, len(c), block_size) for c in chunks)
        if mode == "naive" and chunks:
            wrong = mask_reference(hf, segs, isolate_chunks=False)
        elif mode != "naive" and kept:
            wrong = mask_reference(hf, segs)
        else:
            continue
        assert (got - wrong).abs().max().item() > POWER, f"{prompt}: the wrong reference also matches"
        # The window must not pass as one block, wherever it covers more of a chunk that
        # has something before it (a chunk at position 0 is the same in context or not).
        if mode == "mepic-window" and any(recomputed(mode, len(c), block_size) != recomputed("mepic", len(c), block_size)
                                          for i, (is_chunk, c) in enumerate(segs) if is_chunk and i > 0):
            assert (got - reference(hf, segs, "mepic", block_size)).abs().max().item() > POWER, prompt


def test_bfloat16_reuse_is_within_transformers_own_bfloat16_band(tiny_model_dir, tiny_hf_model, tok):
    """``mepic`` on bf16 pages, its chunks reused at other offsets and orders: every
    request's logits stay within twice the band by which the same reference, run on
    transformers' model cast to bf16, moves from the fp32 one."""
    hf16 = copy.deepcopy(tiny_hf_model).to(torch.bfloat16)
    llm = LLM(tiny_model_dir, num_blocks=256, block_size=8, mode="mepic", dtype="bfloat16")
    cached = 0
    for prompt in REQUESTS:
        segs = segments(tok, prompt)
        got, out = engine_prefill(llm, prompt)
        want = reference(tiny_hf_model, segs, "mepic", 8)
        band = (reference(hf16, segs, "mepic", 8).float() - want).abs().max().item()
        assert 0 < band < 0.2, prompt     # bf16 rounding, far below a wrong layout's error
        assert (got.float() - want).abs().max().item() <= 2 * band, prompt
        cached += out.stats.cached_tokens
    assert cached > 0                     # chunks were read from the bf16 pool
