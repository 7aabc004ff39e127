"""Offline API: ``LLM(...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

from typing import Iterator, Sequence

from tqdm.auto import tqdm

from mepic_ray.config import EngineConfig, StoreConfig
from mepic_ray.engine import LLMEngine
from mepic_ray.output_processor import RequestOutput
from mepic_ray.sampling_params import SamplingParams
from mepic_ray.segments import Chunk, PromptInput, Text


def _as_prompt_list(prompts) -> list[PromptInput]:
    # A list holding any Chunk or Text is one segmented prompt; a list of plain strings
    # (or of segment lists) is a batch.
    if isinstance(prompts, (str, Text)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and any(isinstance(p, (Chunk, Text)) for p in prompts):
        return [prompts]
    return list(prompts)


class LLM:
    def __init__(self, model: str | None = None, mode: str = "mepic", block_size: int = 16,
                 kv_cache_bytes: int | None = None, store: StoreConfig | None = None, **kwargs):
        """``store`` puts the Ray object-store tier below the pool (needs ``ray.init()`` first).
        Without ``kv_cache_bytes`` (or ``num_blocks``) the pool takes ``kv_cache_memory_fraction``
        of the device's memory (``EngineConfig``)."""
        self.engine = LLMEngine(EngineConfig(model=model, mode=mode, block_size=block_size,
                                             kv_cache_bytes=kv_cache_bytes, **kwargs))
        if store is not None:
            self.engine.attach_tier(store)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        batch = _as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(params)} sampling params")
        # Validate everything before queueing anything: a bad prompt must not
        # leave half a batch running.
        reqs = [self.engine.make_request(p, sp) for p, sp in zip(batch, params)]
        for r in reqs:
            self.engine.prefetch(r)
        ids = [self.engine.enqueue(r) for r in reqs]
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), disable=not use_tqdm, desc="generate") as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one output per generated token (``delta_text`` holds the new text)."""
        rid = self.engine.add_request(prompt, sampling_params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             chunks: list[str] = ()) -> RequestOutput:
        """Apply the model's chat template. ``chunks`` go at the start of the last user
        message, each as the chat route places it (``chat.CHUNK_TEMPLATE``); chunks may
        also be marked with the separator inside message contents. Contents are
        :class:`Text`: only the template's own markup makes control tokens."""
        from mepic_ray.chat import CHUNK_TEMPLATE, render_chat
        prompt = render_chat(self.tokenizer, messages, self.engine.cfg.separator,
                             [CHUNK_TEMPLATE.replace("{chunk}", c) for c in chunks])
        return self.generate([prompt], sampling_params)[0]

    def reset_cache(self) -> None:
        self.engine.reset_cache()

    def stats(self) -> dict:
        return self.engine.stats()
