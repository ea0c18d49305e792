"""The FastAPI application behind `vlmlab serve`.

Routes: POST /v1/chat/completions (generative models; streaming as server-sent events),
POST /v1/embeddings and POST /v1/classify (dual encoders), GET /v1/models, /health, /metrics,
and the web page at /. Each generative model has an `infer.batching.Engine`: requests are
parsed and their images decoded on worker threads, then queued; the engine's thread decodes all
running requests together. Every user-caused problem is answered 4xx with OpenAI's error object
whose message says what was wrong; a full queue is 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmlab.errors import BusyError, InputError, VlmlabError
from vlmlab.infer.batching import Engine, Row
from vlmlab.infer.dual import DualEncoder
from vlmlab.serve import protocol
from vlmlab.serve.config import ServeConfig
from vlmlab.serve.media import load_image_url
from vlmlab.serve.metrics import Metrics

STATIC = Path(__file__).parent / "static"
ROUTES = ("/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/models", "/health", "/metrics", "/")


class ApiError(Exception):
    """An HTTP error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.message, self.kind, self.param, self.code), self.status,
                            headers=self.headers)


def api_error(e: Exception) -> ApiError:
    """The HTTP answer to an exception raised while serving a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, BusyError):
        return ApiError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, VlmlabError):
        return ApiError(400, str(e), param=getattr(e, "param", None))
    return ApiError(500, f"internal error ({type(e).__name__}); the server logged it", "server_error")


class Server:
    """The served models and what runs them."""

    def __init__(self, models: dict[str, Any], config: ServeConfig):
        if not models:
            raise InputError("no models to serve")
        self.models, self.config = models, config
        self.engines = {name: Engine(m, max_batch=config.max_batch, max_queue=config.max_queue)
                        for name, m in models.items() if not isinstance(m, DualEncoder)}
        self.locks = {name: threading.Lock() for name in models}
        self.metrics = Metrics()
        self.started = time.time()

    def model(self, name: str, kind: str) -> Any:
        """The model `name`, which must be of `kind` ("generative" or "dual-encoder")."""
        model = self.models.get(name)
        if model is None:
            raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        generative = not isinstance(model, DualEncoder)
        if (kind == "generative") != generative:
            want = [n for n, m in self.models.items() if (not isinstance(m, DualEncoder)) == (kind == "generative")]
            raise ApiError(400, f"model {name!r} is a {model.kind}; this endpoint needs a "
                                f"{'generative model' if kind == 'generative' else 'dual encoder'} "
                                f"(served: {', '.join(want) or 'none'})", param="model")
        return model

    def images(self, urls: list[str]) -> list:
        """Decoded images of a request's image URLs, within the media policy (blocking: a worker thread)."""
        return [load_image_url(url, self.config.media) for url in urls]


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refused past `limit` bytes even without a Content-Length."""
    chunks, size, stream = [], 0, request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            # Read and drop the rest (up to DRAIN_CAP) before answering, as _drain does for a declared
            # length: answering mid-upload would reach the client as a reset connection, not a 413.
            async for chunk in stream:
                size += len(chunk)
                if size > DRAIN_CAP:
                    break
            raise ApiError(413, f"request body is larger than the limit of {limit:,} bytes (max_body_bytes)")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None


class Guard:
    """ASGI middleware: refuses a declared body over the limit before reading it (413), and
    records every request's route, status and latency (to the last byte) in the metrics; a
    response whose client left before its last byte (an abandoned stream) counts as 499."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, finished = 500, False

        async def tracked(message):
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
                self.server.metrics.observe(route, status, time.perf_counter() - start)

        limit = self.server.config.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            await _drain(receive, int(declared))
            error = ApiError(413, f"request body is {int(declared):,} bytes, more than the limit of {limit:,} "
                                  "bytes (max_body_bytes)")
            return await error.response()(scope, receive, tracked)
        try:
            await self.app(scope, receive, tracked)
        finally:
            if not finished:  # the client went away first (or the app failed before answering)
                self.server.metrics.observe(route, 499 if status < 500 else status, time.perf_counter() - start)


DRAIN_CAP = 256 * 1024 * 1024  # the most of a refused body read (and dropped) before answering it


async def _drain(receive, declared: int, cap: int = DRAIN_CAP) -> None:
    """Read and drop a refused body (up to `cap`), so the client gets the answer rather than a
    reset connection in the middle of its upload."""
    seen = 0
    while seen < min(declared, cap):
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body"):
            return


def create_app(models: dict[str, Any], config: ServeConfig | None = None) -> FastAPI:
    """The app serving `models` (name -> a model from `vlmlab.load`)."""
    server = Server(models, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for engine in server.engines.values():
            engine.start()
        yield
        for engine in server.engines.values():
            engine.stop()

    app = FastAPI(title="vlmlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(VlmlabError)
    async def on_user_error(request: Request, e: VlmlabError):
        return api_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message).response()

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        return api_error(e).response()

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(server.models), "uptime_s": round(time.time() - server.started, 1),
                "queue_depth": sum(e.queue_depth for e in server.engines.values()),
                "running": sum(e.running for e in server.engines.values())}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.engines), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(server.started),
                                            "owned_by": "vlmlab", "kind": m.kind} for name, m in server.models.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = protocol.parse_chat(await read_json(request, server.config.max_body_bytes), server.config)
        model = server.model(req.model, "generative")
        engine = server.engines[req.model]
        images, ids, pixels, cfg = await run_in_threadpool(_prepare, model, req, server)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + server.config.request_timeout_s
        def on_event(row: Row, text: str, done: bool) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, (row, text, done))

        rows = [Row(ids, cfg, pixels, deadline=deadline, seed_offset=i, on_event=on_event) for i in range(req.n)]
        try:
            for row in rows:
                engine.submit(row)
        except VlmlabError:
            _cancel(rows)
            raise
        rid = protocol.new_id("chatcmpl")
        if req.stream:
            return StreamingResponse(_stream(rid, req, model, images, rows, events, server.config),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            finished = 0
            while finished < len(rows):
                event = asyncio.ensure_future(events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():  # the client went away: free its rows now, answer no one
                    event.cancel()
                    return Response(status_code=499)
                finished += event.result()[2]
        finally:
            gone.cancel()
            _cancel(rows)
        for row in rows:
            _raise_failure(row, server.config)
        results = [_locate(model, row, images) for row in rows]
        return protocol.chat_completion(rid, req.model, results, len(ids))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = protocol.parse_embeddings(await read_json(request, server.config.max_body_bytes), server.config)
        model = server.model(req.model, "dual-encoder")

        def run():
            images = server.images([x for x in req.inputs if protocol.is_image_input(x)])
            texts = [x for x in req.inputs if not protocol.is_image_input(x)]
            with server.locks[req.model]:
                img = iter(model.embed_image(images)) if images else iter(())
                txt = iter(model.embed_text(texts)) if texts else iter(())
            tokens = sum(len(t) for t in model.text_inputs.tokenizer.encode_batch(texts)) if texts else 0
            return [next(img) if protocol.is_image_input(x) else next(txt) for x in req.inputs], tokens

        vectors, tokens = await run_in_threadpool(run)
        return protocol.embedding_list(req.model, vectors, req.base64, tokens)

    @app.post("/v1/classify")
    async def classify(request: Request):
        name, url, labels, templates = protocol.parse_classify(await read_json(request, server.config.max_body_bytes))
        model = server.model(name, "dual-encoder")

        def run():
            image = server.images([url])
            with server.locks[name]:
                kwargs = {"templates": templates} if templates else {}
                return model.classify(image, labels, **kwargs)[0].tolist()

        probs = await run_in_threadpool(run)
        return {"object": "classification", "model": name, "labels": labels, "probabilities": probs}

    return app


def _prepare(model, req: protocol.ChatRequest, server: Server):
    """The decoded images, prompt ids, pixel values and generation config of a chat request,
    within the limits (blocking: a worker thread)."""
    config = server.config
    images = server.images(req.images)
    ids, pixels = model.prepare(req.messages, images)
    context = model.net.context_length
    limit = min(config.max_prompt_tokens or context - 1, context - 1)
    if len(ids) > limit:
        raise protocol.RequestError(f"the prompt has {len(ids)} tokens, more than the limit of {limit} "
                                    f"(model context {context} tokens)", "messages")
    if req.max_tokens is not None and len(ids) + req.max_tokens > context:
        raise protocol.RequestError(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) is more than the model's context "
            f"of {context} tokens; lower max_tokens to at most {context - len(ids)}", "max_tokens")
    max_new = req.max_tokens or min(config.default_max_tokens, context - len(ids))
    cfg = model.generation_config(stop=req.stop, max_new_tokens=max_new, temperature=req.temperature,
                                  top_p=req.top_p, seed=req.seed)
    return images, ids, pixels, cfg


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancel(rows: list[Row]) -> None:
    for row in rows:
        row.cancelled = True  # the engine frees the row (or skips it in the queue); no-op if finished


def _raise_failure(row: Row, config: ServeConfig) -> None:
    if row.finish_reason == "timeout":
        raise ApiError(408, f"the request took longer than the limit of {config.request_timeout_s:g} s "
                            "(request_timeout_s)", "timeout_error", code="timeout")
    if row.finish_reason == "error":
        raise row.error


def _locate(model, row: Row, images: list):
    result = row.result()
    return model.locate(result, images) if hasattr(model, "locate") else result


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(rid: str, req: protocol.ChatRequest, model, images: list, rows: list[Row],
                  events: asyncio.Queue, config: ServeConfig):
    """Server-sent events in OpenAI's chunk format; the rows are cancelled if the client leaves."""
    created = int(time.time())
    try:
        for i in range(len(rows)):
            yield _sse(protocol.chunk(rid, req.model, created, i, {"role": "assistant", "content": ""}))
        finished = 0
        while finished < len(rows):
            row, text, done = await events.get()
            i = row.seed_offset  # choice i of the request
            if text:
                yield _sse(protocol.chunk(rid, req.model, created, i, {"content": text}))
            if not done:
                continue
            finished += 1
            try:
                _raise_failure(row, config)
            except Exception as e:
                error = api_error(e)
                yield _sse(protocol.error_body(error.message, error.kind, error.param, error.code))
                continue
            delta = protocol.locations(_locate(model, row, images))
            yield _sse(protocol.chunk(rid, req.model, created, i, delta, row.finish_reason))
        if req.include_usage:
            total = sum(len(s.tokens) for s in rows)
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [], "usage": protocol.usage(len(rows[0].prompt), total)})
        yield "data: [DONE]\n\n"
    finally:
        _cancel(rows)
