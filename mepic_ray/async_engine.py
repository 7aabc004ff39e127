"""An asyncio front for the engine: one background thread runs ``step()`` while
any request is in flight, so concurrent callers are batched together."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from typing import AsyncIterator

from mepic_ray.config import EngineConfig, StoreConfig
from mepic_ray.engine import LLMEngine
from mepic_ray.engine_stats import take_snapshot
from mepic_ray.output_processor import RequestOutput
from mepic_ray.sampling_params import SamplingParams
from mepic_ray.segments import PromptInput

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class AsyncLLMEngine:
    def __init__(self, cfg: EngineConfig, store: StoreConfig | None = None, engine: LLMEngine | None = None):
        """``engine``: one built already (and, say, checked by the quality gate) for ``cfg``."""
        self.engine = engine if engine is not None else LLMEngine(cfg)
        self.tier = self.engine.attach_tier(store) if store is not None else None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: deque = deque()
        self._aborts: deque[str] = deque()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mepic-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: PromptInput, params: SamplingParams, request_id: str,
                       resume_ids: list[int] = (), namespace: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields one output per generated token (after ``resume_ids``, an answer's first
        tokens streamed elsewhere: see ``LLMEngine.make_request``), with its KV hashed in
        the tenant's ``namespace`` (``mepic_ray.routing.tenant_layout``); validation errors
        (PromptError, ValueError, RequestTooLargeError) raise before anything is queued."""
        if self._dead is not None:
            raise EngineDeadError(f"engine loop stopped: {self._dead!r}")
        # Tokenizing a long prompt takes a while: not on the loop that streams the others.
        req = await asyncio.to_thread(self.engine.make_request, prompt, params, request_id, resume_ids,
                                      namespace)
        async for out in self._serve(req):
            yield out

    async def _serve(self, req) -> AsyncIterator[RequestOutput]:
        request_id = req.request_id
        if self.tier is not None:   # on this event loop, so the engine thread never waits on Ray
            req.fetched_kv = await self.tier.client.fetch_async(self.tier.wants(req))
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._sinks:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._sinks[request_id] = (asyncio.get_running_loop(), queue)
            self._incoming.append(req)
        self._wake.set()
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._lock:
                self._sinks.pop(request_id, None)
                if not finished:    # the caller went away: free its blocks
                    self._aborts.append(request_id)
            self._wake.set()

    def _loop(self) -> None:
        eng = self.engine
        while True:
            if not eng.has_unfinished() and not self._incoming and not self._aborts:
                self._wake.wait()
                self._wake.clear()
            with self._lock:
                while self._incoming:
                    item = self._incoming.popleft()
                    if callable(item):   # work that must run on the engine thread
                        item()
                        eng.snapshot = take_snapshot(eng, eng.snapshot)
                        continue
                    try:
                        eng.enqueue(item)
                    except Exception as e:   # one bad request must not stop the loop for all
                        log.exception("could not queue request %s", item.request_id)
                        sink = self._sinks.get(item.request_id)
                        if sink is not None:
                            sink[0].call_soon_threadsafe(sink[1].put_nowait, ValueError(f"request refused: {e}"))
                while self._aborts:
                    eng.abort(self._aborts.popleft())
            try:
                outputs = eng.step()
            except BaseException as e:   # keep accepted requests informed, never hang them
                log.exception("engine step failed")
                self._dead = e
                with self._lock:
                    for loop, q in self._sinks.values():
                        loop.call_soon_threadsafe(q.put_nowait, EngineDeadError(f"engine step failed: {e!r}"))
                return
            with self._lock:
                for out in outputs:
                    sink = self._sinks.get(out.request_id)
                    if sink is not None:
                        sink[0].call_soon_threadsafe(sink[1].put_nowait, out)

    def stats(self) -> dict:
        """The pool and queues as of the engine thread's last step (safe from any thread)."""
        eng = self.engine
        # Queue lengths and the prefill in flight are read live (single reads are atomic):
        # a long prefill must show while it runs, not after its step.
        return {**eng.snapshot.stats, "waiting": len(eng.scheduler.waiting) + len(self._incoming),
                "running": len(eng.scheduler.running), "prefilling": eng.prefilling}

    def warm_from_store(self) -> int:
        """Fill up to ``warm_fraction`` of the free pool with the store's most recently
        used chunks (a replica started by autoscaling). Blocking: run it off the event loop."""
        if self.tier is None:
            return 0
        eng, client = self.engine, self.tier.client
        budget = int(client.cfg.warm_fraction * eng.snapshot.stats["free_blocks"]) * eng.bytes_per_block
        adopted = self.adopt(client.recent(budget))
        log.info("warmed %d chunks from the store", len(adopted))
        return len(adopted)

    def demote_resident(self, timeout_s: float) -> int:
        """Send every resident chunk the store lacks down to it and wait, for at most
        ``timeout_s`` in all: what a replica does before it stops. Blocking."""
        if self.tier is None or self._dead is not None:
            return 0
        deadline = time.monotonic() + timeout_s
        missing = self.tier.client.missing(list(self.engine.snapshot.chunks))
        n = self.on_engine_thread(lambda: self.tier.demote_chunks(missing), max(0.1, deadline - time.monotonic()))
        self.tier.client.flush(max(0.0, deadline - time.monotonic()))
        return n

    def adopt(self, items: list) -> list[str]:
        """Make stored chunks (``(meta, kv)``) resident where free pages allow; the hashes
        resident afterwards, adopted now or held already. Blocking: run it off the event loop."""
        eng = self.engine
        return self.on_engine_thread(lambda: [m["hash"] for m, kv in items
                                              if eng.adopt_chunk(m, kv) or m["hash"] in eng.kv.chunks.entries])

    def on_engine_thread(self, fn, timeout_s: float = 60.0):
        """``fn()`` run by the engine thread between steps (the pool is the engine thread's
        alone); its result, or its exception raised here. Blocking: run it off the event loop."""
        done, box = threading.Event(), {}

        def call() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:
                box["error"] = e
            finally:
                done.set()
        with self._lock:
            self._incoming.append(call)
        self._wake.set()
        if not done.wait(timeout=timeout_s):
            raise TimeoutError(f"the engine thread did not run the call within {timeout_s} s")
        if "error" in box:
            raise box["error"]
        return box["result"]

    async def compile_chunks(self, chunks: list, namespace: str | None = None) -> list[dict]:
        """Each chunk (``Chunk`` or ``PublicChunk``) compiled as a request would compile it,
        in ``namespace``: its ``hash``, ``tokens`` (real tokens), and, when it has shared
        blocks, ``kv`` (as ``runner.export_blocks`` gives it) and its store ``meta``."""
        from mepic_ray.segments import Text
        eng = self.engine
        params = SamplingParams(max_tokens=1, temperature=0.0)

        async def compile_one(chunk):
            req = await asyncio.to_thread(eng.make_request, [chunk, Text("\n")], params,
                                          f"compile-{uuid.uuid4().hex}", (), namespace)
            async for out in self._serve(req):
                if out.error:
                    raise ValueError(f"compiling a document failed: {out.error}")
            return req.layout.chunks[0]
        found: dict[int, tuple] = {}
        for _ in range(2):   # a busy pool may evict an idle chunk before it is exported
            todo = [i for i in range(len(chunks)) if i not in found]
            spans = await asyncio.gather(*(compile_one(chunks[i]) for i in todo))
            kvs = await asyncio.to_thread(self.on_engine_thread, lambda: [self.tier.export_chunk(c) for c in spans])
            found.update({i: (c, kv) for i, c, kv in zip(todo, spans, kvs) if kv is not None})
            if len(found) == len(chunks):
                break
        else:
            raise RuntimeError("the pool evicted the documents' chunks before they could be exported: retry")
        return [{"hash": c.chunk_hash, "tokens": c.num_tokens, **kv} for c, kv in map(found.get, range(len(chunks)))]

    def resident_chunks(self) -> dict[str, int]:
        """Chunk hash -> real tokens, for the router, as of the engine thread's last step."""
        return dict(self.engine.snapshot.chunks)
