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
from mepic_ray.core.layout import build_layout
from mepic_ray.core.request import Request
from mepic_ray.core.scheduler import Scheduler
from mepic_ray.core.work import ScheduledSeq, SchedulerOutput
from mepic_ray.engine_stats import EngineSnapshot, take_snapshot
from mepic_ray.output_processor import OutputProcessor, RequestOutput
from mepic_ray.sampling_params import SamplingParams
from mepic_ray.segments import PromptError, PromptInput, split_prompt, text_tokenizer, tokenize_segments
from mepic_ray.worker.model import build_model
from mepic_ray.worker.model_loader import load_weights, resolve_model
from mepic_ray.worker.model_runner import ModelRunner, SeqSpec
from mepic_ray.worker.sampler import sample, token_logprobs

log = logging.getLogger(__name__)


def device_memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of the device's memory: the GPU's, or the host's RAM."""
    if str(device).startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return total, free
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        free = total
    return total, free


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_model(cfg.model)
        loaded = load_weights(path)
        self.model_path, self.model_config, self.fingerprint = path, loaded.config, loaded.fingerprint
        self.model = build_model(loaded, cfg.dtype, cfg.device)
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
        self.num_blocks = cfg.num_blocks or max(1, self._pool_bytes() // self.bytes_per_block)
        self.pool_summary = (f"KV pool: {self.num_blocks} blocks of {cfg.block_size} tokens "
                             f"({self.num_blocks * cfg.block_size} tokens, "
                             f"{self.num_blocks * self.bytes_per_block / 2**20:.0f} MiB)")
        log.info(self.pool_summary)
        self.kv = KVCacheManager(cfg.reuse, cfg.block_size, self.num_blocks, self.bytes_per_block)
        self.runner = ModelRunner(self.model, mc, cfg, self.num_blocks)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.eos_ids = set(mc.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        self.output = OutputProcessor(self.tokenizer, self.eos_ids, self.max_model_len)
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._generators: dict[str, torch.Generator] = {}
        self.tier = None         # tier.engine_tier.EngineTier once attached
        # Requests in the forward pass now running that are still being prefilled: read
        # from other threads while a long prompt is in flight (stats, fault tests).
        self.prefilling = 0
        self.num_aborted = 0     # requests whose caller went away or gave up before the end
        self.snapshot: EngineSnapshot = take_snapshot(self)

    def _pool_bytes(self) -> int:
        cfg = self.cfg
        if cfg.kv_cache_bytes is not None:
            return cfg.kv_cache_bytes
        total, free = device_memory(cfg.device)
        return int(min(cfg.kv_cache_memory_fraction * total, 0.5 * free))

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
                     request_id: str | None = None, resume_ids: list[int] = ()) -> Request:
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
        layout = build_layout(segments, self.cfg.block_size, self.cfg.reuse.chunked, self.fingerprint)
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
        self.prefilling = len(out.prefills)
        try:
            self._move_kv(out)
            outputs = failed if out.empty else failed + self._postprocess(out, *self._run(out))
        finally:
            self.prefilling = 0
        # Also after an empty step: aborts and failures change the pool too.
        self.snapshot = take_snapshot(self, self.snapshot)
        return outputs

    def _move_kv(self, out: SchedulerOutput) -> None:
        """The step's KV operations, in the order that keeps every block's bytes valid:
        demote evicted chunks before anything reuses their blocks, then load, compile, copy."""
        runner = self.runner
        for d in out.demotions:
            self.tier.demote(d.chunk_hash, d.padded_ids, d.shared_tokens, runner.export_blocks(d.blocks))
        for job in out.loads:
            runner.import_blocks(job.entry.blocks, job.kv)
            job.entry.ready = True
        if out.compiles:
            specs = []
            for job in out.compiles:
                n_pad = sum(1 for t in job.padded_ids if t < 0)
                positions = [-1] * n_pad + list(range(len(job.padded_ids) - n_pad))
                specs.append(SeqSpec(list(job.padded_ids), positions, job.block_table,
                                     list(range(n_pad, len(job.padded_ids)))))
            t0 = time.perf_counter()
            runner.forward(specs)
            if self.tier is not None:
                if runner.device.type == "cuda":
                    torch.cuda.synchronize()
                self.tier.client.costs.observe_compile(time.perf_counter() - t0,
                                                       sum(len(s.query_slots) for s in specs))
            for job in out.compiles:
                if job.host_copy:
                    runner.take_host_copy(job.chunk_hash, job.block_table, len(job.padded_ids))
                self.kv.finish_compile(job)
                if job.publish:
                    e = job.entry
                    self.tier.demote(e.chunk_hash, e.token_ids, self.kv.shared_tokens(e.token_ids),
                                     runner.export_blocks(e.blocks))
        for c in out.copies:
            runner.copy_in(c.chunk_hash, c.blocks)
        runner.drop_host_copies(out.dropped_copies)

    def _run(self, out: SchedulerOutput) -> tuple[list[int], list]:
        probes = [s for s in out.prefills if s.probe_blocks]
        if probes:   # MEPIC block selection first: it decides which shared blocks the prefill recomputes
            picked = self.runner.select_blocks([SeqSpec(s.request.token_ids, s.request.positions, s.block_table,
                                                        s.query_slots) for s in probes],
                                               [s.probe_blocks for s in probes], [s.num_selected for s in probes])
            for seq, blocks in zip(probes, picked):
                self.kv.recompute_selected(seq, blocks)
        seqs = out.prefills + out.decodes
        specs = [SeqSpec(s.request.token_ids, s.request.positions, s.block_table, s.query_slots,
                         s.blend_candidates) for s in seqs]
        blend = self.runner.blend is not None and bool(out.prefills)
        hidden = self.runner.forward(specs, blend=blend)
        if blend:
            for seq, selected in zip(out.prefills, self.runner.last_blend_selected):
                fixed = set(seq.query_slots) - set(seq.blend_candidates)
                seq.account(sorted(fixed.union(selected)), seq.request.layout.chunk_of_block, self.cfg.block_size)
        logits = self.runner.logits(hidden)
        self.last_logits = logits   # the step's logits, one row per scheduled request (tests, debugging)
        reqs = [s.request for s in seqs]
        params = [r.params for r in reqs]
        tokens = sample(logits, params, [self._generators[r.request_id] for r in reqs])
        return tokens, token_logprobs(logits, tokens, params)

    def _postprocess(self, out: SchedulerOutput, tokens: list[int], logprobs: list) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = []
        for seq in out.prefills:
            seq.request.stats.first_token_s = now
            self.kv.register_prefix(seq.request)
        for seq, tok, lp in zip(out.prefills + out.decodes, tokens, logprobs):
            req = seq.request
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
