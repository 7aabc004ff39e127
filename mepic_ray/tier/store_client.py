"""A replica's side of the object-store tier: demote evicted chunks in the background,
and load a missing chunk's blocks when that is cheaper than compiling it. Nothing here
may block or break the engine loop: demotions are queued to a worker thread, lookups and
loads happen before a request is queued (on the caller's event loop or thread), and every
store failure degrades to a miss, that is, to recomputing the chunk."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter

import ray
import torch

from mepic_ray.tier.chunk_store import get_or_create_store
from mepic_ray.config import StoreConfig
from mepic_ray.tier.kv_codec import ChunkWant, decode_kv, encode_kv
from mepic_ray.tier.store_policy import Breaker, CostModel

log = logging.getLogger(__name__)


class StoreClient:
    def __init__(self, cfg: StoreConfig, fingerprint: str, layout: dict):
        self.cfg, self.fingerprint = cfg, fingerprint
        self.layout = layout      # block_size, recompute window, dtype, per-slot shape: must match to load
        self.dtype = getattr(torch, layout["dtype"])
        self.costs = CostModel()
        self.counts: Counter[str] = Counter()
        self.published: set[str] = set()     # known to be in the store: never demoted twice
        self._inflight: set[str] = set()      # queued for demotion, not yet acknowledged
        self.breaker = Breaker(cfg.retry_after_s)
        self._store = None
        self._lock = threading.Lock()          # guards the actor handle
        self._pending_lock = threading.Lock()  # guards the queued-bytes count, never held across a call
        self._pending_bytes = 0
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._demote_loop, name="mepic-demote", daemon=True).start()

    # -- the actor, re-created if it died -----------------------------------
    def store(self):
        with self._lock:
            if self._store is None:
                self._store = get_or_create_store(self.cfg.name, self.cfg.namespace, self.cfg.budget_bytes,
                                                  self.cfg.pin_budget_bytes, self.cfg.placement)
            return self._store

    def _failed(self, kind: str, err: BaseException) -> None:
        self.counts[f"error_{kind}"] += 1
        log.warning("chunk store %s failed (%s: %s); falling back to recompute", kind, type(err).__name__, err)
        if not kind.endswith("load"):    # one lost object says nothing about the store itself
            self.breaker.failure()
        if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            with self._lock:
                self._store = None
                self.published.clear()    # a new store holds none of them

    def _unreadable(self, chunk_hash: str, ref, err: BaseException, kind: str = "load") -> None:
        """One stored object could not be used. Unless it was merely slow, the store is told
        to drop it, so this chunk's next demotion replaces it instead of counting as a duplicate."""
        self._failed(kind, err)
        if isinstance(err, TimeoutError) or not ray.is_initialized():
            return
        try:
            self.store().drop.remote(chunk_hash, [ref])
            self.counts["store_dropped"] += 1
        except Exception as e:   # the store itself is gone: its entries went with it
            self._failed("drop", e)

    # -- demotion (engine thread enqueues, worker thread sends) -------------
    def demote(self, chunk_hash: str, padded_ids: tuple[int, ...], shared_tokens: int, kv: torch.Tensor) -> bool:
        if chunk_hash in self.published:
            return False
        nbytes = kv.numel() * kv.element_size()
        with self._pending_lock:
            if self._pending_bytes + nbytes > self.cfg.max_pending_bytes:
                self.counts["demotions_dropped"] += 1
                return False
            self._pending_bytes += nbytes
        self._inflight.add(chunk_hash)
        self.published.add(chunk_hash)
        self._queue.put((self.meta(chunk_hash, padded_ids, shared_tokens, kv), kv.detach().to("cpu", copy=True)))
        return True

    def meta(self, chunk_hash: str, padded_ids: tuple[int, ...], shared_tokens: int, kv: torch.Tensor) -> dict:
        """What the store keeps beside a chunk's KV, and a reader checks before loading it."""
        return {"hash": chunk_hash, "token_ids": tuple(padded_ids), "num_tokens": shared_tokens,
                "fingerprint": self.fingerprint, "layout": self.layout, "shape": tuple(kv.shape),
                "nbytes": kv.numel() * kv.element_size()}

    def _demote_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            if time.monotonic() - last_sync >= self.cfg.resync_s:
                self._resync()
                last_sync = time.monotonic()
            try:
                meta, kv = self._queue.get(timeout=self.cfg.resync_s)
            except queue.Empty:
                continue
            try:
                if not ray.is_initialized() or not self.breaker.allow():
                    ok = False
                    self.counts["demotions_dropped"] += 1
                else:
                    ok = ray.get(self.store().put.remote(meta, encode_kv(kv)), timeout=self.cfg.timeout_s)
                    self.breaker.success()
                    self.counts["demotions" if ok else "demotions_rejected"] += 1
                if not ok:
                    self.published.discard(meta["hash"])
            except Exception as e:
                self.published.discard(meta["hash"])
                self._failed("demote", e)
            finally:
                self._inflight.discard(meta["hash"])
                with self._pending_lock:
                    self._pending_bytes -= meta["nbytes"]
                self._queue.task_done()

    def _resync(self) -> None:
        """Forget published chunks the store has since evicted under its budget, so this
        replica demotes them again when its own pool lets them go."""
        known = list(self.published - self._inflight)
        # Never the call that (re)starts Ray: after ray.shutdown() a remote call would
        # quietly start a new local instance from this thread.
        if not known or not ray.is_initialized() or not self.breaker.allow():
            return
        try:
            held = set(ray.get(self.store().present.remote(known), timeout=self.cfg.timeout_s))
        except Exception as e:
            self._failed("resync", e)
            return
        self.breaker.success()
        gone = set(known) - held
        self.published -= gone
        self.counts["store_evicted"] += len(gone)

    def missing(self, hashes: list[str]) -> list[str]:
        """Which of these the store lacks now (all of them when it cannot be asked), and
        forgotten as published, so that ``demote`` sends them again."""
        try:
            held = set(ray.get(self.store().present.remote(list(hashes)), timeout=self.cfg.timeout_s))
        except Exception as e:
            self._failed("resync", e)
            held = set()
        gone = [h for h in hashes if h not in held]
        self.published.difference_update(gone)
        return gone

    def _available(self) -> bool:
        """False while the breaker is open: the request skips the store (and compiles)."""
        if self.breaker.allow():
            return True
        self.counts["store_skipped"] += 1
        return False

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for queued demotions (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- loading --------------------------------------------------------------
    def _choose(self, wants: list[ChunkWant], found: dict) -> list[tuple[ChunkWant, dict, object]]:
        chosen = []
        for w in wants:
            hit = found.get(w.chunk_hash)
            if hit is None:
                self.counts["store_misses"] += 1
                continue
            meta = hit["meta"]
            if (meta["fingerprint"] != self.fingerprint or meta["layout"] != self.layout
                    or tuple(meta["token_ids"]) != tuple(w.padded_ids) or tuple(meta["shape"]) != tuple(w.shape)):
                self.counts["store_mismatch"] += 1
                log.warning("stored chunk %s does not match this replica's model or layout; recomputing",
                            w.chunk_hash)
                continue
            self.counts["store_hits"] += 1
            policy = self.cfg.load_policy
            if policy == "never" or policy == "cost" and not self.costs.load_is_cheaper(w.shared_tokens, meta["nbytes"]):
                self.counts["load_skipped_cost"] += 1
                continue
            chosen.append((w, meta, hit["ref"][0]))
        return chosen

    def _decode(self, chosen, bufs, started: float) -> dict[str, torch.Tensor]:
        out, nbytes = {}, 0
        for (w, meta, ref), buf in zip(chosen, bufs):
            try:
                if isinstance(buf, BaseException):
                    raise buf
                out[w.chunk_hash] = decode_kv(buf, self.dtype, w.shape)
            except Exception as e:   # lost, timed out or malformed: this chunk alone is compiled
                self._unreadable(w.chunk_hash, ref, e)
                continue
            self.published.add(w.chunk_hash)
            nbytes += meta["nbytes"]
        seconds = time.perf_counter() - started
        if out:
            self.costs.observe_load(seconds, nbytes)
            self._count_reads("load", len(out), nbytes, seconds)
        return out

    def _count_reads(self, kind: str, n: int, nbytes: int, seconds: float) -> None:
        """``loads``/``load_*`` for reads a request waits on, ``warm_*`` for reads ahead of any."""
        self.counts["loads" if kind == "load" else f"{kind}_loads"] += n
        self.counts[f"{kind}_bytes"] += nbytes
        self.counts[f"{kind}_us"] += int(seconds * 1e6)

    async def fetch_async(self, wants: list[ChunkWant]) -> dict[str, torch.Tensor]:
        if not wants or not self._available():
            return {}
        try:
            ref = self.store().lookup.remote([w.chunk_hash for w in wants])
            found = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.cfg.timeout_s)
        except Exception as e:
            self._failed("lookup", e)
            return {}
        self.breaker.success()
        chosen = self._choose(wants, found)
        t1 = time.perf_counter()
        bufs = await asyncio.gather(*(self._get_one(r) for _, _, r in chosen))
        return self._decode(chosen, bufs, t1)

    async def _get_one(self, ref):
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.cfg.timeout_s)
        except Exception as e:   # object lost with its owner, timeout: this chunk is recomputed
            return e

    def fetch(self, wants: list[ChunkWant]) -> dict[str, torch.Tensor]:
        """Blocking twin of ``fetch_async`` for the offline engine."""
        if not wants or not self._available():
            return {}
        try:
            found = ray.get(self.store().lookup.remote([w.chunk_hash for w in wants]), timeout=self.cfg.timeout_s)
        except Exception as e:
            self._failed("lookup", e)
            return {}
        self.breaker.success()
        chosen = self._choose(wants, found)
        t1 = time.perf_counter()
        bufs = []
        for _, _, r in chosen:
            try:
                bufs.append(ray.get(r, timeout=self.cfg.timeout_s))
            except Exception as e:
                bufs.append(e)
        return self._decode(chosen, bufs, t1)

    def recent(self, max_bytes: int) -> list[tuple[dict, torch.Tensor]]:
        """The store's most recently used chunks of this model, decoded, for warming a new replica."""
        if not self._available():
            return []
        try:
            items = ray.get(self.store().recent.remote(max_bytes, self.fingerprint), timeout=self.cfg.timeout_s)
        except Exception as e:
            self._failed("warm", e)
            return []
        return self._warm_items(items)

    def warm_updates(self, cursor: int) -> tuple[list[tuple[dict, torch.Tensor]], int]:
        """Chunks of documents registered with ``warm`` since ``cursor``, decoded, and the new cursor."""
        if not ray.is_initialized() or not self.breaker.allow():
            return [], cursor
        try:
            items, new_cursor = ray.get(self.store().warm_since.remote(cursor), timeout=self.cfg.timeout_s)
        except Exception as e:
            self._failed("warm", e)
            return [], cursor
        return self._warm_items([it for it in items if it["meta"]["fingerprint"] == self.fingerprint]), new_cursor

    def _warm_items(self, items: list[dict]) -> list[tuple[dict, torch.Tensor]]:
        out = []
        for it in items:
            meta = it["meta"]
            if meta["layout"] != self.layout:
                continue
            try:
                t0 = time.perf_counter()
                buf = ray.get(it["ref"][0], timeout=self.cfg.timeout_s)
                out.append((meta, decode_kv(buf, self.dtype, tuple(meta["shape"]))))
                self.published.add(meta["hash"])
                self._count_reads("warm", 1, meta["nbytes"], time.perf_counter() - t0)
            except Exception as e:   # one lost object does not spoil the rest
                self._unreadable(meta["hash"], it["ref"][0], e, kind="warm_load")
        return out

    async def holdings(self, node_id: str | None) -> dict[str, int]:
        if not self.breaker.allow():    # not a request path: no skip to count
            return {}
        try:
            ref = self.store().holdings.remote(node_id)
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.cfg.timeout_s)
        except Exception as e:
            self._failed("holdings", e)
            return {}
