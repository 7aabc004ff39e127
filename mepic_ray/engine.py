"""The engine: add requests, then ``step()`` = schedule -> run -> postprocess."""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import replace

import torch

from mepic_ray.config import EngineConfig
from mepic_ray.core.kv_manager import KVCacheManager, RequestTooLargeError
from mepic_ray.core.request import Request
from mepic_ray.core.scheduler import Scheduler
from mepic_ray.core.work import ScheduledSeq, SchedulerOutput
from mepic_ray.engine_stats import EngineSnapshot, take_snapshot
from mepic_ray.output_processor import OutputProcessor, RequestOutput
from mepic_ray.routing import tenant_layout
from mepic_ray.sampling_params import SamplingParams
from mepic_ray.segments import PromptError, PromptInput, split_prompt, text_tokenizer, tokenize_segments
from mepic_ray.worker.memory import keep_host_temporaries, pool_bytes
from mepic_ray.worker.model import build_model
from mepic_ray.worker.model_loader import load_weights, resolve_model
from mepic_ray.worker.model_runner import ModelRunner, SeqSpec
from mepic_ray.worker.sampler import sample, token_logprobs

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not str(cfg.device).startswith("cuda"):
            keep_host_temporaries(cfg.host_heap_keep_bytes)
        path = resolve_model(cfg.model)
        loaded = load_weights(path)
        self.model_path, self.model_config, self.fingerprint = path, loaded.config, loaded.fingerprint
        self.model = build_model(loaded, cfg.dtype, cfg.device, cfg.torch_compile)
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.text_tokenizer = text_tokenizer(self.tokenizer)
        probe = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        self.bos_token_id = bos if bos is not None and probe and probe[0] == bos else None
        mc = self.model_config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        dtype_bytes = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
        self.bytes_per_block = 2 * mc.num_layers * cfg.block_size * mc.num_kv_heads * mc.head_dim * dtype_bytes
        self.num_blocks = cfg.num_blocks or max(1, pool_bytes(cfg) // self.bytes_per_block)
        self.pool_summary = (f"KV pool: {self.num_blocks} blocks of {cfg.block_size} tokens "
                             f"({self.num_blocks * cfg.block_size} tokens, "
                             f"{self.num_blocks * self.bytes_per_block / 2**20:.0f} MiB)")
        log.info(self.pool_summary)
        self.kv = KVCacheManager(cfg.reuse, cfg.block_size, self.num_blocks, self.bytes_per_block)
        self.runner = ModelRunner(self.model, mc, cfg, self.num_blocks)
        selection = cfg.reuse.selection()
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   selection[1] / mc.num_layers if selection else 0.0)
        self.eos_ids = set(mc.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        self.output = OutputProcessor(self.tokenizer, self.eos_ids, self.max_model_len)
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._generators: dict[str, torch.Generator] = {}
        self.tier = None         # tier.engine_tier.EngineTier once attached
        # Requests in the forward pass now running that are still being prefilled: read
        # from other threads while a long prompt is in flight (stats, fault tests).
        self.prefilling = 0
        self.step_tokens = 0     # tokens the last step computed (probes scaled by their depth)
        self.computed_tokens = 0     # ... and all steps so far
        self.num_steps = 0
        self.num_aborted = 0     # requests whose caller went away or gave up before the end
        self.snapshot: EngineSnapshot = take_snapshot(self)

    def attach_tier(self, store_cfg):
        """Put the Ray object-store tier below this engine's pool (shared-chunk modes only)."""
        from mepic_ray.tier.engine_tier import EngineTier
        if not self.cfg.reuse.shares_chunks:
            raise ValueError(f"the store tier holds canonical chunk blocks; mode {self.cfg.mode!r} has none")
        self.tier = EngineTier(store_cfg, self)
        self.kv.demote_evicted = True
        self.kv.publish_compiled = store_cfg.write_through
        return self.tier

    def chunk_kv_shape(self, num_blocks: int) -> tuple[int, ...]:
        """What ``runner.export_blocks`` gives for that many blocks."""
        mc = self.model_config
        return (2, mc.num_layers, num_blocks * self.cfg.block_size, mc.num_kv_heads, mc.head_dim)

    def prefetch(self, req: Request) -> None:
        """Blocking load of the request's missing chunks (offline use; replicas fetch asynchronously)."""
        if self.tier is not None:
            req.fetched_kv = self.tier.client.fetch(self.tier.wants(req))

    def adopt_chunk(self, meta: dict, kv: torch.Tensor) -> bool:
        """Make a stored chunk resident (idle, evictable) without a request: warming a new
        replica. Run on the engine thread, between steps."""
        padded = tuple(meta["token_ids"])
        need = len(padded) // self.cfg.block_size - self.kv.recomputed_blocks(padded)
        if need < 1 or tuple(kv.shape) != self.chunk_kv_shape(need):
            return False    # not this engine's block layout: never copy it in
        entry = self.kv.adopt_chunk(meta["hash"], padded)
        if entry is None:
            return False
        self.runner.import_blocks(entry.blocks, kv)
        self.kv.finish_adopt(entry)
        return True

    # -- requests -----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Markup: control-token markers become control tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        """User text and chunks: control-token markers stay text."""
        return self.text_tokenizer.encode(text, add_special_tokens=False)

    def make_request(self, prompt: PromptInput, params: SamplingParams | None = None,
                     request_id: str | None = None, resume_ids: list[int] = (),
                     namespace: str | None = None) -> Request:
        """``resume_ids``: the first answer tokens, already streamed by a replica that died.
        They are computed like prompt text, count against ``max_tokens``, and the output
        continues after them as an uninterrupted run would."""
        params = params or SamplingParams()
        segments = tokenize_segments(split_prompt(prompt, self.cfg.separator), self.encode, self.bos_token_id,
                                     self.encode_text)
        resume_ids = list(resume_ids)
        if any(type(t) is not int for t in resume_ids):
            raise PromptError("resumed token ids must be ints")
        if resume_ids and len(resume_ids) >= params.max_tokens:
            raise PromptError(f"{len(resume_ids)} resumed tokens leave nothing of max_tokens={params.max_tokens}")
        segments[-1].token_ids.extend(resume_ids)    # the last segment is always prompt text
        layout = tenant_layout(segments, prompt, self.cfg.block_size, self.cfg.reuse.chunked, self.fingerprint,
                               namespace)
        if any(not 0 <= t < self.model_config.vocab_size for s in segments for t in s.token_ids):
            raise PromptError("token id outside the model's vocabulary")
        n = len(layout.token_ids)
        if n >= self.max_model_len:
            raise PromptError(f"prompt takes {n} slots (padding included) but the context is {self.max_model_len}")
        # max_tokens is capped to what can follow the prompt: in the context, and (while
        # admission reserves a request's worst case) in the pool. The answer then ends
        # with finish_reason "length".
        room = min(self.max_model_len - n, self.kv.room_after(layout))
        if room < 1:
            raise RequestTooLargeError(f"the prompt's {n} slots (padding included) leave no room for an answer: "
                                       f"the KV pool has only {self.num_blocks} blocks of {self.cfg.block_size} tokens")
        if params.max_tokens - len(resume_ids) > room:
            params = replace(params, max_tokens=room + len(resume_ids))
        req = Request(request_id or f"req-{next(self._ids)}", prompt, params, segments, layout,
                      num_resumed=len(resume_ids))
        self.kv.check_fits(req)
        if resume_ids:
            self.output.replay(req)
        return req

    def add_request(self, prompt: PromptInput, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        return self.enqueue(self.make_request(prompt, params, request_id))

    def enqueue(self, req: Request) -> str:
        seed = req.params.seed
        if seed is not None and req.num_resumed:
            # A resumed stream must not reuse the draws that chose the tokens it resumes
            # after (its continuation would depend on them): a seed of its own, still
            # the same for every retry at this point.
            seed = (seed * 1_000_003 + req.num_resumed) % 2**63
        self._generators[req.request_id] = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng)))
        self.scheduler.add(req)
        return req.request_id

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self._generators.pop(request_id, None)
        self.output.drop(request_id)
        self.num_aborted += req is not None
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the loop -----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        failed = [RequestOutput(r.request_id, "", [], True, "error", "", [], r.stats, error=msg)
                  for r, msg in out.failed]
        for r, _ in out.failed:
            self._generators.pop(r.request_id, None)
        self.prefilling = len({id(p.request) for p in out.probes} | {id(s.request) for s in out.prefills})
        try:
            self._move_kv(out)
            outputs = failed if out.empty else failed + self._postprocess(out, *self._run(out))
        finally:
            self.prefilling = 0
        # A piece scheduled with a probe was given room for the most the probe could pick.
        self.step_tokens = out.num_tokens - sum(p.seq.num_tokens - len(p.seq.query_slots)
                                                for p in out.probes if p.seq is not None)
        self.computed_tokens += self.step_tokens
        self.num_steps += not out.empty
        # Also after an empty step: aborts and failures change the pool too.
        self.snapshot = take_snapshot(self, self.snapshot)
        return outputs

    def _move_kv(self, out: SchedulerOutput) -> None:
        """The KV operations before the forward, in the order that keeps every block's
        bytes valid: demote evicted chunks before anything reuses their blocks, then
        load chunks from the store and copy host copies into private blocks."""
        runner = self.runner
        for d in out.demotions:
            self.tier.demote(d.chunk_hash, d.padded_ids, d.shared_tokens, runner.export_blocks(d.blocks))
        for job in out.loads:
            runner.import_blocks(job.entry.blocks, job.kv)
            job.entry.ready = True
        for c in out.copies:
            runner.copy_in(c.chunk_hash, c.blocks)
        runner.drop_host_copies(out.dropped_copies)

    def _run(self, out: SchedulerOutput) -> tuple[list[ScheduledSeq], list[int], list]:
        """Probes, then one forward over the compile pieces, prefill pieces and decodes;
        the sequences that end their work are sampled."""
        if out.probes:   # they decide which chunk slots the prefills recompute
            scores = self.runner.probe([SeqSpec(p.request.token_ids, p.request.positions, p.block_table,
                                                p.query_slots, local_spans=self.kv.local_spans(p.request))
                                        for p in out.probes],
                                       [p.candidates for p in out.probes],
                                       [p.write_candidates for p in out.probes], self.cfg.reuse.selection()[1])
            for probe, sc in zip(out.probes, scores):
                self.kv.apply_probe(probe, sc)
        seqs = out.prefills + out.decodes
        specs = [SeqSpec(list(p.job.padded_ids), p.job.positions, p.job.block_table, p.query_slots)
                 for p in out.compiles]
        specs += [SeqSpec(s.request.token_ids, s.request.positions, s.block_table, s.query_slots,
                          self.kv.shared_runs(s.request), self.kv.local_spans(s.request)) for s in seqs]
        if not specs:    # a probe alone filled the step
            return [], [], []
        t0 = time.perf_counter()
        hidden = self.runner.forward(specs)
        self._finish_compiles(out, time.perf_counter() - t0, specs)
        sampled = [s for s in seqs if s.samples]
        rows = [len(out.compiles) + i for i, s in enumerate(seqs) if s.samples]
        if not sampled:
            return [], [], []
        logits = self.runner.logits(hidden[rows])
        self.last_logits = logits   # the step's logits, one row per sampled sequence (tests, debugging)
        reqs = [s.request for s in sampled]
        params = [r.params for r in reqs]
        tokens = sample(logits, params, [self._generators[r.request_id] for r in reqs])
        return sampled, tokens, token_logprobs(logits, tokens, params)

    def _finish_compiles(self, out: SchedulerOutput, seconds: float, specs: list[SeqSpec]) -> None:
        runner = self.runner
        if self.tier is not None and out.compiles:
            # The compile rode in a forward with other work: its share of the time, by rows.
            tokens = sum(len(p.query_slots) for p in out.compiles)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            self.tier.client.costs.observe_compile(seconds * tokens / sum(len(s.query_slots) for s in specs), tokens)
        for piece in out.compiles:
            if not piece.last:
                continue
            job = piece.job
            if self.kv.finish_compile(job):
                runner.take_host_copy(job.chunk_hash, job.block_table, len(job.padded_ids))
            if job.publish:
                e = job.entry
                self.tier.demote(e.chunk_hash, e.token_ids, self.kv.shared_tokens(e.token_ids),
                                 runner.export_blocks(e.blocks))

    def _postprocess(self, out: SchedulerOutput, sampled: list[ScheduledSeq], tokens: list[int],
                     logprobs: list) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = []
        prefills = {id(s) for s in out.prefills}
        for seq, tok, lp in zip(sampled, tokens, logprobs):
            req = seq.request
            if id(seq) in prefills:       # its last piece: the prompt is in the pool
                if req.stats.first_token_s is None:
                    req.stats.first_token_s = now
                self.kv.register_prefix(req, len(req.layout.token_ids))
            req.append_token(tok)
            if lp is not None:
                req.logprobs.append(lp)
            result = self.output.process(req)
            if result.finished:
                req.stats.finished_s = now
                self.scheduler.finish(req)
                self._generators.pop(req.request_id, None)
            outputs.append(result)
        return outputs

    def reset_cache(self) -> None:
        self.kv.reset_cache()
        self.runner.drop_host_copies(self.kv.copies.take_dropped())
        self.snapshot = take_snapshot(self, self.snapshot)

    def stats(self) -> dict:
        """Pool and queue figures now (call on the engine's thread; others read ``snapshot``)."""
        self.snapshot = take_snapshot(self, self.snapshot)
        return dict(self.snapshot.stats)
