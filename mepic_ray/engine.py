"""The engine: add requests, then ``step()`` = schedule -> run -> postprocess."""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import replace

import torch

from mepic_ray.config import EngineConfig
from mepic_ray.core.kv_manager import KVCacheManager
from mepic_ray.worker.model import LlamaForCausalLM
from mepic_ray.worker.model_loader import load_weights, resolve_model
from mepic_ray.worker.model_runner import ModelRunner, SeqSpec
from mepic_ray.core.request import Request, build_layout
from mepic_ray.output_processor import OutputProcessor, RequestOutput
from mepic_ray.worker.sampler import sample, token_logprobs
from mepic_ray.sampling_params import SamplingParams
from mepic_ray.core.scheduler import ScheduledBatch, Scheduler
from mepic_ray.tier.engine_tier import StoreTier
from mepic_ray.segments import PromptError, PromptInput, split_prompt, tokenize_segments

log = logging.getLogger(__name__)


class LLMEngine(StoreTier):
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_model(cfg.model)
        loaded = load_weights(path)
        self.model_path, self.model_config, self.fingerprint = path, loaded.config, loaded.fingerprint
        self.model = self._build_model(loaded)
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        probe = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        self.bos_token_id = bos if bos is not None and probe and probe[0] == bos else None
        mc = self.model_config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        dtype_bytes = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
        block_bytes = 2 * mc.num_layers * cfg.block_size * mc.num_kv_heads * mc.head_dim * dtype_bytes
        self.num_blocks = cfg.num_blocks or max(1, cfg.kv_cache_bytes // block_bytes)
        self.kv = KVCacheManager(cfg, self.num_blocks)
        self.runner = ModelRunner(self.model, mc, cfg, self.num_blocks)
        self.scheduler = Scheduler(cfg, self.kv, self.runner.host_store)
        self.eos_ids = set(mc.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        self.output = OutputProcessor(self.tokenizer, self.eos_ids, self.max_model_len)
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._generators: dict[str, torch.Generator] = {}
        self.store = None
        # Requests in the forward pass now running that are still being prefilled: read
        # from other threads while a long prompt is in flight (stats, fault tests).
        self.prefilling = 0
        self.num_aborted = 0     # requests whose caller went away or gave up before the end

    def _build_model(self, loaded) -> LlamaForCausalLM:
        dtype = getattr(torch, self.cfg.dtype)
        with torch.device("meta"):
            model = LlamaForCausalLM(loaded.config)
        state = {k: v.to(dtype) for k, v in loaded.state_dict.items() if "rotary_emb" not in k}
        if loaded.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (m == "lm_head.weight" and loaded.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if loaded.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(self.cfg.device).eval()

    # -- requests -----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def make_request(self, prompt: PromptInput, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        params = params or SamplingParams()
        segments = tokenize_segments(split_prompt(prompt, self.cfg.separator), self.encode, self.bos_token_id)
        layout = build_layout(segments, self.cfg.block_size, self.cfg.chunked, self.fingerprint)
        n = len(layout.token_ids)
        if n >= self.max_model_len:
            raise PromptError(f"prompt takes {n} slots (padding included) but the context is {self.max_model_len}")
        if params.max_tokens > self.max_model_len - n:
            params = replace(params, max_tokens=self.max_model_len - n)
        if any(t >= self.model_config.vocab_size for s in segments for t in s.token_ids):
            raise PromptError("token id outside the model's vocabulary")
        req = Request(request_id or f"req-{next(self._ids)}", prompt, params, segments, layout)
        self.kv.check_fits(req)
        return req

    def add_request(self, prompt: PromptInput, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        return self.enqueue(self.make_request(prompt, params, request_id))

    def enqueue(self, req: Request) -> str:
        seed = req.params.seed
        self._generators[req.request_id] = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng)))
        self.scheduler.add(req)
        return req.request_id

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self._generators.pop(request_id, None)
        self.num_aborted += req is not None
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the loop -----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        failed = [RequestOutput(r.request_id, "", [], True, "error", "", [], r.stats, error=msg)
                  for r, msg in batch.failed]
        for r, _ in batch.failed:
            self._generators.pop(r.request_id, None)
        if batch.empty:
            return failed
        self.prefilling = len(batch.prefills)
        try:
            tokens, logprobs = self._run(batch)
        finally:
            self.prefilling = 0
        return failed + self._postprocess(batch, tokens, logprobs)

    def _run(self, batch: ScheduledBatch) -> tuple[list[int], list]:
        runner = self.runner
        for job in batch.compiles:
            if job.load is not None:
                runner.import_pages(job.block_table, job.load)
                job.load = None
                self.kv.finish_compile(job)
        compiles = [j for j in batch.compiles if not j.entry or not j.entry.ready]
        if compiles:
            specs = []
            for job in compiles:
                n_pad = sum(1 for t in job.padded_ids if t < 0)
                positions = [-1] * n_pad + list(range(len(job.padded_ids) - n_pad))
                specs.append(SeqSpec(list(job.padded_ids), positions, job.block_table,
                                     list(range(n_pad, len(job.padded_ids)))))
            t0 = time.perf_counter()
            runner.forward(specs)
            if self.store is not None:
                if self.runner.device.type == "cuda":
                    torch.cuda.synchronize()
                self.store.costs.observe_compile(time.perf_counter() - t0,
                                                 sum(len(s.query_slots) for s in specs))
            for job in compiles:
                if job.snapshot:
                    runner.snapshot(job.chunk_hash, job.block_table, len(job.padded_ids))
                self.kv.finish_compile(job)
                if self.store is not None and self.store.cfg.write_through and job.entry is not None:
                    self._demote(job.entry)
        for req in batch.prefills:
            for chunk_hash, blocks in req.copies:
                runner.copy_in(chunk_hash, blocks)
        specs = [SeqSpec(r.token_ids, r.positions, r.block_table, r.query_slots, r.blend_candidates)
                 for r in batch.prefills]
        specs += [SeqSpec(r.token_ids, r.positions, r.block_table, [r.num_slots - 1]) for r in batch.decodes]
        blend = self.cfg.mode == "cacheblend" and bool(batch.prefills)
        hidden = runner.forward(specs, blend=blend)
        if blend:
            for req, selected in zip(batch.prefills, runner.last_blend_selected):
                fixed = set(req.query_slots) - set(req.blend_candidates)
                req.set_computed(sorted(fixed.union(selected)), self.cfg.block_size)
        reqs = batch.prefills + batch.decodes
        logits = runner.logits(hidden)
        self.last_logits = logits   # the step's logits, one row per scheduled request (tests, debugging)
        params = [r.params for r in reqs]
        tokens = sample(logits, params, [self._generators[r.request_id] for r in reqs])
        return tokens, token_logprobs(logits, tokens, params)

    def _postprocess(self, batch: ScheduledBatch, tokens: list[int], logprobs: list) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = []
        for req in batch.prefills:
            req.prefilled = True
            req.stats.first_token_s = now
            self.kv.register_prefix(req)
        for req, tok, lp in zip(batch.prefills + batch.decodes, tokens, logprobs):
            req.append_token(tok)
            if lp is not None:
                req.logprobs.append(lp)
            outputs.append(self._finish_check(req, now))
        return outputs

    def _finish_check(self, req: Request, now: float) -> RequestOutput:
        out = self.output.process(req)
        if out.finished:
            req.stats.finished_s = now
            self.scheduler.finish(req)
            self._generators.pop(req.request_id, None)
        return out

    # -- introspection ------------------------------------------------------
    def stats(self) -> dict:
        pool, chunks = self.kv.pool, self.kv.chunks
        used = pool.num_blocks - pool.num_free - chunks.idle_blocks
        return {
            "total_blocks": pool.num_blocks,
            "free_blocks": pool.num_free,
            "used_blocks": used,
            "shared_blocks": pool.num_shared,
            "peak_used_blocks": pool.peak_used,
            "cached_chunk_blocks": sum(len(e.blocks) for e in chunks.entries.values()),
            "idle_chunk_blocks": chunks.idle_blocks,
            "num_chunks": len(chunks.entries),
            "reserved_blocks": self.kv.reserved,
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "prefilling": self.prefilling,
            "aborted": self.num_aborted,
        }
