"""The OpenAI-compatible ingress: validates requests, tokenizes and hashes their
chunks (so the router can send them to the replica holding those chunks), streams
results and retries on replicas that die."""
import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from deployments.auth import load_api_keys
from deployments.body import read_body
from deployments.schema import CHAT_SCHEMA, COMPLETION_SCHEMA, REGISTER_SCHEMA, openapi_body
from deployments.documents import DocumentStore, chunk_ids, ok, parse_registration
from deployments.protocol import ApiError, load_json, parse_chat, parse_completion
from deployments.responses import Responses

api = FastAPI(title="mepic-ray")
log = logging.getLogger("ray.serve")


class _Run:
    """The replica stream a request is being served by now (replaced when it resumes)."""

    def __init__(self, gen):
        self.gen = gen


# The ingress only waits on replicas: Serve's default of 5 ongoing requests would
# make the sixth concurrent stream wait at the proxy for one to finish.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1024)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, engine, model_name: str = "mepic", model: str | None = None, server: dict | None = None):
        from transformers import AutoTokenizer
        from mepic_ray.worker.model_loader import resolve_model
        server = dict(server or {})
        self.queue_timeout_s = float(server.pop("queue_timeout_s", 120.0))     # until the first token
        self.request_timeout_s = float(server.pop("request_timeout_s", 600.0))  # the whole non-streamed answer
        self.max_retries = int(server.pop("max_retries", 2))                   # on replicas that die
        self.max_body_bytes = int(server.pop("max_body_bytes", 8 * 2**20))
        from mepic_ray.chat import CHUNK_TEMPLATE
        # How the chat route places each chunk in the user message ({chunk}: its text).
        self.chunk_template = str(server.pop("chunk_template", CHUNK_TEMPLATE))
        if self.chunk_template.count("{chunk}") != 1:
            raise ValueError(f"server.chunk_template must hold {{chunk}} once, got {self.chunk_template!r}")
        # None: no tenants (no key asked for, one namespace). Else every /v1 route needs a key.
        self.api_keys = load_api_keys(server.pop("api_keys_file", None))
        if server:
            raise ValueError(f"unknown server options: {sorted(server)}")
        self.engine = engine
        self.model_name = model_name
        from mepic_ray.segments import text_tokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model)))
        self.text_tokenizer = text_tokenizer(self.tokenizer)
        # No token spells more bytes than this, so a prompt of more than max_model_len
        # times as many bytes cannot fit, whatever it says: refused before tokenizing.
        # A normalizer can shrink text before tokenizing: then allow four times as much.
        longest = max(len(self.tokenizer.decode([i]).encode()) for i in range(len(self.tokenizer)))
        self.max_token_bytes = (longest + 1) * (1 if self.tokenizer.backend_tokenizer.normalizer is None else 4)
        # Parsing, chat templates and tokenizing run here, never on the event loop that
        # answers /health and streams every other request.
        self.cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mepic-tokenize")
        self.responses = Responses(self.tokenizer, model_name)
        self.documents = DocumentStore()
        self.info: dict | None = None

    async def _model_info(self) -> dict:
        if self.info is None:
            self.info = await self.engine.model_info.remote()
        return self.info

    def _namespace(self, request: Request) -> str | None:
        """The namespace the request's KV is hashed in; raises Unauthorized (401)."""
        return None if self.api_keys is None else self.api_keys.tenant(request.headers.get("authorization"))

    def _prepare(self, body, chat: bool, info: dict, namespace: str | None = None, documents: dict | None = None):
        """The parsed request and what the router ranks replicas by
        (``mepic_ray.routing.RoutingInfo``: each chunk's hash and tokens, and the chained
        hashes of the full blocks of prompt text before the first chunk). ``documents``:
        the registered ones it names, id -> (text, public). Runs on ``self.cpu``; raises ApiError."""
        from mepic_ray.routing import build_routing
        if chat:
            req = parse_chat(body, self.model_name, info["separator"], self.tokenizer, self.chunk_template, documents)
        else:
            req = parse_completion(body, self.model_name, info["separator"], self.tokenizer, documents)
        size = sum(len((x if isinstance(x, str) else x.get("chunk", x.get("text"))).encode()) for x in req.items)
        if size > info["max_model_len"] * self.max_token_bytes:
            raise ApiError(f"the prompt's {size} bytes cannot fit the context of {info['max_model_len']} tokens "
                           f"(no token is longer than {self.max_token_bytes} bytes)", param="prompt",
                           code="context_length_exceeded")
        routing = build_routing(req.items, lambda t: self.tokenizer.encode(t, add_special_tokens=False),
                                info["fingerprint"], info["block_size"],
                                lambda t: self.text_tokenizer.encode(t, add_special_tokens=False), namespace)
        return req, routing

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/v1/mepic/stats")
    async def engine_stats(self, request: Request):
        """KV pool and queue figures of one engine replica (the router picks which; header says):
        counts over all tenants, never a hash or a text."""
        try:
            self._namespace(request)
        except ApiError as e:
            return e.response()
        try:
            s = await self.engine.stats.remote()
        except Exception as e:
            return ApiError(f"engine unavailable: {type(e).__name__}", status=503, retry_after=2).response()
        return JSONResponse(s, headers={"x-mepic-replica": s["replica"]})

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._namespace(request)
        except ApiError as e:
            return e.response()
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "mepic-ray"}]}

    @api.post("/v1/completions", openapi_extra=openapi_body(COMPLETION_SCHEMA))
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=openapi_body(CHAT_SCHEMA))
    async def chat(self, request: Request):
        return await self._serve(request, chat=True)

    # -- registered documents (deployments/documents.py) ------------------------
    @api.post("/v1/chunks", openapi_extra=openapi_body(REGISTER_SCHEMA))
    async def register_documents(self, request: Request):
        """Compile documents into the object-store tier ahead of traffic (one replica
        compiles them; all are registered or none)."""
        try:
            namespace = self._namespace(request)
            raw = await read_body(request, self.max_body_bytes)
            info = await self._model_info()
            self.documents.handle(info)
            reg = await asyncio.get_running_loop().run_in_executor(
                self.cpu, parse_registration, raw, info["separator"], self.chunk_template,
                info["max_model_len"] * self.max_token_bytes)
            del raw
            try:
                answer = await self.engine.register_documents.remote({"namespace": namespace,
                                                                      "documents": reg.documents, "warm": reg.warm})
            except Exception as e:   # the replica died or is overloaded: all or none of it is registered
                raise ApiError(f"engine unavailable ({type(e).__name__}): GET /v1/chunks tells whether the "
                               "documents were registered; registering them again is safe", status=503,
                               retry_after=2)
            return {"object": "list", "data": ok(answer)}
        except ApiError as e:
            return e.response()

    @api.get("/v1/chunks")
    async def list_documents(self, request: Request):
        return await self._documents(request, "documents_list")

    @api.get("/v1/chunks/{doc_id}")
    async def get_document(self, request: Request, doc_id: str):
        return await self._documents(request, "documents_get", doc_id)

    @api.delete("/v1/chunks/{doc_id}")
    async def delete_document(self, request: Request, doc_id: str):
        return await self._documents(request, "documents_delete", doc_id)

    async def _documents(self, request: Request, method: str, *args):
        try:
            namespace = self._namespace(request)
            value = await self.documents.call(await self._model_info(), method, namespace or "", *args)
        except ApiError as e:
            return e.response()
        if method == "documents_list":
            return {"object": "list", "data": value}
        return {"id": args[0], "object": "chunk", "deleted": True} if method == "documents_delete" else value

    async def _serve(self, request: Request, chat: bool):
        try:
            namespace = self._namespace(request)    # before the body: no key, nothing read
            raw = await read_body(request, self.max_body_bytes)
            info = await self._model_info()
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self.cpu, load_json, raw)
            del raw
            documents = None
            if ids := chunk_ids(body):
                found = await self.documents.call(info, "documents_resolve", namespace or "", ids)
                documents = {d["id"]: (d["text"], d["public"]) for d in found}
            req, routing = await loop.run_in_executor(self.cpu, self._prepare, body, chat, info, namespace, documents)
        except ApiError as e:
            return e.response()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        payload = {"prompt": req.items, "sampling": req.sampling, "request_id": rid, "namespace": namespace,
                   "routing": routing}   # mepic_ray.routing.PAYLOAD_KEY
        try:
            first, gen = await self._start(payload)
        except ApiError as e:
            return e.response()
        run = _Run(gen)
        if req.stream:
            events = self.responses.sse(rid, chat, self._follow(payload, first, run), run, req.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"x-mepic-replica": first["replica"]})
        text, last, logprobs = "", first, []
        try:
            async with asyncio.timeout(self.request_timeout_s):
                async for item in self._follow(payload, first, run):
                    if item.get("error"):   # 503: replicas kept failing; 500: the engine refused it mid-way
                        status = item.get("status", 500)
                        return ApiError(item["error"], status=status).response(retry_after=1 if status == 503 else None)
                    text += item["delta"]
                    logprobs += item.get("logprobs") or []
                    last = item
        except TimeoutError:
            return ApiError(f"request took longer than {self.request_timeout_s} s", status=504,
                            code="timeout").response()
        finally:
            run.gen.cancel()   # when it did not finish, the replica aborts it and frees its pages
        # The engine's final text is authoritative (the joined deltas equal it unless a
        # tokenizer rewrote already-streamed text).
        text = last.get("text") or text
        wanted = req.sampling.get("logprobs") is not None
        return JSONResponse(self.responses.body(rid, chat, text, last, logprobs if wanted else None),
                            headers={"x-mepic-replica": last["replica"]})

    async def _follow(self, payload: dict, first: dict, run: "_Run"):
        """The request's items from ``first`` on. When its replica dies, the request goes
        on on another one: the answer's tokens so far are sent as a forced prefix
        (``resume``), and only what follows them comes back, so the items join up as
        one uninterrupted answer. After ``max_retries`` such failures, an error item."""
        item, sent, resumes = first, [], 0
        while True:
            yield item
            if item.get("error") or item["finished"]:
                return
            sent += item["token_ids"]
            try:
                item = await run.gen.__anext__()
                continue
            except StopAsyncIteration:
                return
            except Exception as e:
                run.gen.cancel()
                if resumes == self.max_retries:
                    yield {"error": f"engine replicas failed while serving the request ({type(e).__name__})",
                           "status": 503}
                    return
                resumes += 1
                log.warning("replica failed after %d tokens (%s); resuming, retry %d", len(sent),
                            type(e).__name__, resumes)
            try:   # a new id: the old replica may still hold the old one if it did not die
                item, run.gen = await self._start({**payload, "request_id": f"{payload['request_id']}-{resumes}",
                                                   "resume": list(sent)})
            except ApiError as err:
                yield {"error": err.message, "status": err.status}
                return

    async def _start(self, payload: dict):
        """Send to a replica and wait for its first item; retries on replicas that died
        before answering. Raises ApiError (503 with Retry-After when overloaded, 504 when
        the request waited longer than ``queue_timeout_s``)."""
        from ray.serve.exceptions import BackPressureError
        for attempt in range(self.max_retries + 1):
            gen = self.engine.options(stream=True).generate.remote(payload)
            try:
                first = await asyncio.wait_for(gen.__anext__(), self.queue_timeout_s)
            except BackPressureError:
                raise ApiError("server overloaded: engine queues are full", status=503, code="overloaded",
                               retry_after=2)
            except TimeoutError:
                gen.cancel()
                raise ApiError(f"no engine started the request within {self.queue_timeout_s} s", status=504,
                               code="timeout", retry_after=2)
            except Exception as e:   # the replica or its engine loop died before answering
                log.warning("replica unavailable (%s); retry %d", type(e).__name__, attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if first.get("error") and first.get("status"):
                raise ApiError(first["error"], status=first["status"], retry_after=first.get("retry_after"))
            return first, gen
        raise ApiError("engine unavailable", status=503, retry_after=2)
