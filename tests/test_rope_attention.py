"""Test 4: paged attention over keys stored rotated at their stored positions (a
chunk's at chunk-local ones), turned by each slot's offset, equals rotate-then-attend.

The oracle rotates the unrotated K with transformers' own Llama RoPE at each slot's
position in the request, lays the slots out contiguously and runs an explicit softmax loop."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mepic_ray.kernels import RopeTable, apply_rope, build_paged_seq, paged_attention_ref, rope_inv_freq, write_kv


def hf_cos_sin(positions, head_dim, theta, scaling=None):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    kw = dict(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=theta, max_position_embeddings=8192)
    if scaling:
        kw["rope_scaling"] = scaling
    rot = LlamaRotaryEmbedding(LlamaConfig(**kw))
    x = torch.zeros(1, 1, head_dim)
    cos, sin = rot(x, positions.clamp(min=0)[None])
    return cos[0], sin[0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), block_size=st.sampled_from([4, 8, 16]), n_slots=st.integers(1, 60),
       gqa=st.sampled_from([1, 3]), llama3=st.booleans())
def test_paged_rope_attention_matches_rotate_then_attend(seed, block_size, n_slots, gqa, llama3):
    g = torch.Generator().manual_seed(seed)
    kvh, hd = 2, 16
    h = kvh * gqa
    scaling = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64} if llama3 else None)
    theta = 10000.0
    # Position map with padding: random pads, real tokens contiguous from a random offset.
    is_pad = torch.rand(n_slots, generator=g) < 0.3
    is_pad[-1] = False
    offset = int(torch.randint(0, 500, (1,), generator=g))
    positions = torch.full((n_slots,), -1, dtype=torch.long)
    positions[~is_pad] = torch.arange(int((~is_pad).sum())) + offset
    n_blocks = -(-n_slots // block_size)
    pool_blocks = n_blocks + 5
    block_table = torch.randperm(pool_blocks, generator=g)[:n_blocks]
    k_cache = torch.randn(pool_blocks * block_size, kvh, hd, generator=g)
    v_cache = torch.randn(pool_blocks * block_size, kvh, hd, generator=g)
    k_nope = torch.randn(n_slots, kvh, hd, generator=g)
    v = torch.randn(n_slots, kvh, hd, generator=g)
    logical = torch.arange(n_slots)
    slots = block_table[logical // block_size] * block_size + logical % block_size
    real = torch.nonzero(~is_pad).flatten()
    # Cut the real slots into segments; a chunk's keys are stored at positions from 0.
    offsets = torch.zeros(n_slots, dtype=torch.long)
    cuts = sorted(set(torch.randint(0, real.numel(), (3,), generator=g).tolist()) | {0})
    for a, b in zip(cuts, cuts[1:] + [real.numel()]):
        if bool(torch.rand(1, generator=g) < 0.6):
            offsets[real[a:b]] = positions[real[a]]
    offsets[is_pad] = -1
    rope = RopeTable(hd, theta, scaling)
    k_stored = apply_rope(k_nope, *rope.lookup(torch.where(is_pad, 0, positions - offsets)))
    write_kv(k_cache, v_cache, k_stored, v, torch.where(is_pad, -1, slots))
    q_logical = real[torch.randperm(real.numel(), generator=g)[: max(1, real.numel() // 2)]].sort().values
    q_nope = torch.randn(q_logical.numel(), h, hd, generator=g)

    seq = build_paged_seq(0, q_logical, block_table, offsets, block_size, rope)
    q_cos, q_sin = rope.lookup(positions[q_logical])
    out = paged_attention_ref(apply_rope(q_nope, q_cos, q_sin), k_cache, v_cache, [seq], 1 / math.sqrt(hd))

    # Oracle: transformers' RoPE, contiguous K, explicit masked softmax.
    cos, sin = hf_cos_sin(positions, hd, theta, scaling)
    k_rot = apply_rotary_pos_emb(k_nope.transpose(0, 1)[None], k_nope.transpose(0, 1)[None], cos[None], sin[None])[0][0]
    qc, qs = cos[q_logical], sin[q_logical]
    q_rot = apply_rotary_pos_emb(q_nope.transpose(0, 1)[None], q_nope.transpose(0, 1)[None], qc[None], qs[None])[0][0]
    expected = torch.zeros_like(out)
    for i, ql in enumerate(q_logical.tolist()):
        for head in range(h):
            kv = head // gqa
            keys = [j for j in range(ql + 1) if not is_pad[j]]
            scores = torch.stack([q_rot[head, i] @ k_rot[kv, j] for j in keys]) / math.sqrt(hd)
            w = torch.softmax(scores, 0)
            expected[i, head] = sum(w[t] * v[j, kv] for t, j in enumerate(keys))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_padding_slots_are_never_read():
    """Garbage (NaN) in padding slots must not reach the output."""
    bs, kvh, hd = 4, 1, 8
    k_cache = torch.full((3 * bs, kvh, hd), float("nan"))
    v_cache = torch.full((3 * bs, kvh, hd), float("nan"))
    positions = torch.tensor([-1, -1, 0, 1, 2, 3, -1, 4])
    block_table = torch.tensor([2, 0])
    logical = torch.arange(8)
    slots = block_table[logical // bs] * bs + logical % bs
    real = positions >= 0
    write_kv(k_cache, v_cache, torch.randn(8, kvh, hd), torch.randn(8, kvh, hd), torch.where(real, slots, -1))
    rope = RopeTable(hd, 10000.0)
    seq = build_paged_seq(0, torch.tensor([7]), block_table, positions, bs, rope)
    out = paged_attention_ref(torch.randn(1, 1, hd), k_cache, v_cache, [seq], 0.3)
    assert torch.isfinite(out).all()


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(128, 500000.0, scaling), expected.float(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="unsupported rope"):
        rope_inv_freq(128, 1e4, {"rope_type": "yarn", "factor": 2.0})
