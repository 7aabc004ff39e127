"""The engine replica: one engine and its KV pool per Serve replica. It streams one
dict per generated token to the ingress and reports what it holds to the router."""
import logging
import threading
from typing import Any

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class EngineServer:
    def __init__(self, engine_config: dict | None = None, store_config: dict | None = None,
                 quality_gate: dict | None = None):
        import ray
        from mepic_ray.async_engine import AsyncLLMEngine
        from mepic_ray.calibrate import QualityGate, check
        from mepic_ray.config import EngineConfig, StoreConfig
        from mepic_ray.engine import LLMEngine
        from deployments.metrics import EngineMetrics
        store = StoreConfig(**store_config) if store_config is not None else None
        cfg = EngineConfig(**(engine_config or {}))
        engine = LLMEngine(cfg)
        log = logging.getLogger("ray.serve")
        if quality_gate is not None and cfg.mode != "full":   # before any traffic: it drives the engine itself
            report = check(engine, QualityGate(**{k: tuple(v) if k == "formats" else v for k, v in quality_gate.items()}))
            log.info("quality gate against full recompute:\n%s", report.table())
        self.engine = AsyncLLMEngine(cfg, store=store, engine=engine)
        log.info(engine.pool_summary)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self.metrics = EngineMetrics(self.replica)
        self.store_cfg = store
        if store is not None:
            threading.Thread(target=self._warm_loop, name="mepic-warm", daemon=True).start()

    def _warm_loop(self) -> None:
        """Documents registered with ``warm`` (all of them at start, then each new one),
        then, once, the store's most recent chunks: a replica started by autoscaling
        begins with the chunks others made."""
        import time
        client, cursor, started = self.engine.tier.client, 0, False
        while True:
            try:
                items, cursor = client.warm_updates(cursor)
                held = self.engine.adopt(items) if items else []
                if held:
                    client.store().report_warm.remote(self.replica, held)
                if not started:
                    started = True
                    self.engine.warm_from_store()
            except Exception:   # warming is an optimisation: never let it end the loop
                logging.getLogger("ray.serve").exception("warming from the store failed")
            time.sleep(self.store_cfg.warm_poll_s)

    def __del__(self):
        """Serve calls this when it stops the replica (scale-down, redeploy): the chunks only
        this pool holds go down to the store first, so the other replicas load them rather
        than compile them again. Serve picks which replica stops (by node and age), not us."""
        engine = getattr(self, "engine", None)
        if engine is None or getattr(self, "store_cfg", None) is None or getattr(self, "_stopping", False):
            return
        self._stopping = True
        try:
            n = engine.demote_resident(self.store_cfg.shutdown_demote_s)
            logging.getLogger("ray.serve").info("stopping: demoted %d chunks the store lacked", n)
        except Exception:
            logging.getLogger("ray.serve").exception("demoting chunks before stopping failed")

    def stats(self) -> dict:
        tier = self.engine.tier
        return {"replica": self.replica, **self.engine.stats(),
                "store": dict(tier.client.counts) if tier is not None else None}

    def model_info(self) -> dict:
        e = self.engine.engine
        store = self.store_cfg
        return {"fingerprint": e.fingerprint, "block_size": e.cfg.block_size, "separator": e.cfg.separator,
                "model_path": str(e.model_path), "max_model_len": e.max_model_len,
                "store": None if store is None else {"name": store.name, "namespace": store.namespace}}

    async def register_documents(self, payload: dict) -> dict:
        """Compile ``payload["documents"]`` in every route form they ask for and commit them
        to the store's registry in one call (all or none): the store's answer, or an error."""
        from mepic_ray.core.kv_manager import RequestTooLargeError
        from mepic_ray.routing import PublicChunk
        from mepic_ray.segments import Chunk, PromptError
        from mepic_ray.tier.documents import text_digest
        from mepic_ray.tier.kv_codec import encode_kv
        owner, docs = payload["namespace"] or "", payload["documents"]
        store = self.engine.tier.client.store()
        pre = await store.documents_existing.remote(owner, [(d["id"], d["public"], text_digest(d["text"]))
                                                            for d in docs])
        if "error" in pre:   # a conflict costs no compile
            return pre
        forms = [(i, route, text) for i, d in enumerate(docs) for route, text in d["forms"].items()]
        try:
            compiled = await self.engine.compile_chunks([(PublicChunk if docs[i]["public"] else Chunk)(t)
                                                         for i, _, t in forms], payload["namespace"])
        except (PromptError, RequestTooLargeError, ValueError) as e:
            return {"error": f"a document cannot be compiled: {e}", "status": 400}
        new = [{**{k: d[k] for k in ("id", "public", "text", "metadata", "pin", "ttl_s")},
                "forms": {}, "nbytes": {}, "tokens": 0} for d in docs]
        for (i, route, _), c in zip(forms, compiled):
            shared = "kv" in c
            new[i]["forms"][route] = c["hash"] if shared else ""
            if shared:
                new[i]["nbytes"][c["hash"]] = c["meta"]["nbytes"]
            if route == "completions" or not new[i]["tokens"]:
                new[i]["tokens"] = c["tokens"]
        kvs = {c["hash"]: (c["meta"], c["kv"]) for c in compiled if "kv" in c}
        present = set(await store.present.remote(list(kvs)))
        answer = {}
        for send in ({h: v for h, v in kvs.items() if h not in present}, kvs):   # all, if pins left meanwhile
            answer = await store.documents_register.remote(
                owner, new, {h: (meta, encode_kv(kv)) for h, (meta, kv) in send.items()}, payload["warm"])
            if answer.get("code") != "need_kv":
                break
        return answer

    async def record_routing_stats(self) -> dict[str, Any]:
        s = self.engine.stats()
        tier = self.engine.tier
        self.metrics.observe_stats(s, tier.client.counts if tier is not None else None)
        # Chunks in the object store with a copy on this node: a weaker affinity than the pool.
        stored = list(await tier.client.holdings(self.node_id)) if tier is not None else []
        return {"chunks": list(self.engine.resident_chunks()), "stored": stored,
                "free_blocks": s["free_blocks"] + s["idle_chunk_blocks"],
                "running": s["running"], "waiting": s["waiting"], "prefilling": s["prefilling"]}

    async def generate(self, payload: dict):
        """Streams dicts: one per token, or a single ``{"error": ...}`` for input the engine refuses."""
        from mepic_ray.core.kv_manager import RequestTooLargeError
        from mepic_ray.sampling_params import SamplingParams
        from mepic_ray.routing import prompt_items
        from mepic_ray.segments import PromptError
        try:
            items = prompt_items(payload["prompt"])
            params = SamplingParams(**payload["sampling"])
            stream = self.engine.generate(items, params, payload["request_id"], payload.get("resume", ()),
                                          payload.get("namespace"))
            async for out in stream:
                if out.finished:
                    self.metrics.observe_request(out)
                yield {"replica": self.replica, "delta": out.delta_text, "token_ids": out.delta_token_ids,
                       "text": out.text if out.finished else None,
                       "logprobs": None if out.delta_logprobs is None else
                       [[t, lp, top] for t, (lp, top) in zip(out.delta_token_ids, out.delta_logprobs)],
                       "finished": out.finished, "finish_reason": out.finish_reason, "error": out.error,
                       "usage": {"prompt_tokens": out.stats.prompt_tokens, "completion_tokens": len(out.token_ids),
                                 "cached_tokens": out.stats.cached_tokens, "recomputed_tokens": out.stats.recomputed_tokens,
                                 "compiled_tokens": out.stats.compiled_tokens, "loaded_tokens": out.stats.loaded_tokens,
                                 "chunks_pool": out.stats.chunks_pool, "chunks_store": out.stats.chunks_store,
                                 "chunks_miss": out.stats.chunks_miss, "resumed_tokens": out.stats.resumed_tokens}}
        except (PromptError, RequestTooLargeError, ValueError) as e:
            yield {"replica": self.replica, "error": str(e), "status": 400}
