"""Shared fixtures: a tiny random Llama saved as a Hugging Face folder, and the
embedded SmolLM2 when its package is installed."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors through the interpreter when there is no GPU;
# it must be chosen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def byte_tokenizer():
    """A byte-level BPE with no merges: every byte is a token, plus </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    # Sorted: the alphabet comes in a different order in every process, and with it
    # which byte each id (and each random embedding) stands for.
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


def make_tiny_llama(path, *, seed=0, layers=2, hidden=64, heads=4, kv_heads=2, rope_scaling=None,
                    qwen2=False, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    tok = byte_tokenizer()
    kw = dict(vocab_size=260, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
              rope_theta=10000.0, tie_word_embeddings=tie, eos_token_id=tok.eos_token_id,
              bos_token_id=None, pad_token_id=None)
    if rope_scaling:
        kw["rope_scaling"] = rope_scaling
    torch.manual_seed(seed)
    cfg = (Qwen2Config if qwen2 else LlamaConfig)(**kw)
    model = (Qwen2ForCausalLM if qwen2 else LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():   # larger weights make logits peaky, so argmax ties are rare
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if "embed" in name else 0.08)
            if qwen2 and name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind(request):
    """A module whose fixture failed after ``ray.init`` never reaches its teardown, and a
    Ray instance left up fails every later module's ``ray.init`` ("called twice"), so
    one failure reads as a hundred. Shut it down here and say which module left it."""
    yield
    import sys
    import warnings
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    warnings.warn(f"{request.module.__name__} left Ray running; shut down after it")
    try:
        from ray import serve
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny tensors: on a loaded 2-core machine intra-op threads only add
    OpenMP waits (test_reuse_vs_hf.py ran ~50x slower with them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_dir():
    from mepic_ray.worker.model_loader import ModelNotFoundError, resolve_model
    try:
        return str(resolve_model(None))
    except ModelNotFoundError as e:
        pytest.skip(str(e))
