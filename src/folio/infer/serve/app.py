"""The server's routes: the page and its JSON (`/api/...`), the OpenAI-compatible API
(`/v1/...`), authentication, CORS and body limits; `serve` runs it with uvicorn.

FastAPI (on Starlette) + uvicorn: maintained, small, async, and streaming responses and
middleware are part of the framework; request bodies are checked by api.py so every error is
OpenAI-shaped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from folio.config import ServeConfig
from folio.errors import FolioError
from folio.infer.sample import check_sampling, encode_prompt
from folio.infer.serve import api
from folio.infer.serve.api import ApiError, CompletionRequest
from folio.infer.serve.engine import Engine, Job
from folio.infer.serve.runs import ModelPool, RunIndex, read_metrics_chunk, summarise
from folio.watch.report import load_cards, render_report

T = TypeVar("T")

STATIC = resources.files("folio.infer.serve") / "static"


def create_app(cfg: ServeConfig) -> FastAPI:
    """The whole server for `cfg` (its engine thread starts now; `app.state.engine.close()`)."""
    index = RunIndex(cfg.run_dirs, cfg.runs_dir or ("" if cfg.run_dirs else "."))
    pool = ModelPool(index, cfg.max_models, cfg.device, cfg.dtype)
    relay = Relay()
    engine = Engine(cfg.max_active, cfg.queue_size, cfg.batch, after_step=relay.flush)
    limits = api.Limits(cfg.max_tokens, cfg.max_prompt_chars, cfg.max_n)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="folio serve", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine, app.state.pool, app.state.index = engine, pool, index

    if cfg.api_key:
        app.add_middleware(RequireKey, key=cfg.api_key)
    if cfg.cors_origin:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=[cfg.cors_origin],
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error(ApiError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error(exc)

    # ------------------------------------------------------------------------ the page

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/api/runs")
    async def runs() -> dict[str, Any]:
        found = await asyncio.to_thread(index.scan)
        return {"runs": [await asyncio.to_thread(summarise, name, path)
                         for name, path in found.items()]}

    @app.get("/api/runs/{name}/metrics")
    async def metrics(name: str, offset: int = 0) -> dict[str, Any]:
        return await asyncio.to_thread(read_metrics_chunk, run_dir(name), offset)

    @app.get("/api/runs/{name}/report", include_in_schema=False)
    async def run_report(name: str, x: str = "iter") -> Response:
        return await report_page([name], x)

    @app.get("/api/report", include_in_schema=False)
    async def compare_report(request: Request, x: str = "iter") -> Response:
        return await report_page(request.query_params.getlist("run"), x)

    async def report_page(names: list[str], x: str) -> Response:
        """The report card of the named runs (several: compared), from their files: the
        samples are those `folio report` or the end of training wrote."""
        if not names:
            raise ApiError(400, "name at least one run: /api/report?run=NAME&run=OTHER",
                           code="no_runs")
        dirs = [run_dir(n) for n in names]
        try:
            page = await asyncio.to_thread(report_html, dirs, names, x)
        except FolioError as e:
            message = str(e)
            for d, n in zip(dirs, names, strict=True):
                message = message.replace(str(d), n)
            raise ApiError(400, message, code="no_report") from None
        return HTMLResponse(page)

    @app.get("/api/status")
    async def status() -> dict[str, Any]:
        return {**engine.load(), "loaded": pool.loaded_names()}

    def run_dir(name: str):
        found = index.get(name)
        if found is None:
            raise ApiError(404, f"no run named {name!r}; GET /api/runs lists them",
                           code="run_not_found")
        return found

    # ------------------------------------------------------------------------ the API

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = await asyncio.to_thread(index.names)
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        run_dir(name)
        return model_card(name)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def complete(request: Request, chat: bool) -> Response:
        body = api.parse_json(await read_body(request, cfg.max_body_bytes))
        req = api.parse_request(body, chat, limits)
        not_found = ApiError(404, f"the model {req.model!r} does not exist; GET /v1/models "
                             "lists the runs this server has", param="model",
                             code="model_not_found")
        if index.get(req.model) is None:
            raise not_found
        check_sampling(req.temperature, req.top_k, req.top_p, req.stop)  # api.py kept to it
        busy = ApiError(429, f"the server is busy ({engine.capacity} requests running or "
                        "queued); retry later", code="queue_full", type="rate_limit_error")
        if engine.full():  # before a model load, which can take a while
            raise busy
        try:  # a model loaded with the newest weights at once; else loaded off the loop
            loaded = pool.ready(req.model) or await in_own_thread(pool.get, req.model)
        except KeyError:  # the run dir vanished since
            raise not_found from None
        except FolioError as e:  # a run being written, or a corrupt one
            message = str(e).replace(str(index.get(req.model)), req.model)
            raise ApiError(400, f"the model {req.model!r} cannot be loaded: {message}",
                           param="model", code="model_not_available") from None
        if chat:  # the run's chat template, or a base model's script
            prompt_ids, stop = api.chat_prompt(req, loaded.tokenizer, loaded.info,
                                               cfg.strict_template)
        else:
            try:
                prompt_ids, stop = encode_prompt(loaded.tokenizer, req.prompt), req.stop
            except FolioError as e:
                raise ApiError(400, str(e), param="prompt", code="bad_prompt") from None
        events: asyncio.Queue = asyncio.Queue()
        emit = relay.sender(events)
        job = Job(loaded, prompt_ids, req.max_tokens, req.temperature, req.top_k, req.top_p,
                  stop, req.seed, req.n, emit)
        if not engine.submit(job):
            raise busy
        if req.stream:
            return EventStream(ChunkWriter(req, len(prompt_ids)), events, job)
        return await collect(req, len(prompt_ids), events, job, request)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "folio"}

    return app


# ---------------------------------------------------------------------------- helpers

class RequireKey:
    """ASGI middleware: every /v1/ and /api/ request must carry `Authorization: Bearer KEY`.

    Plain ASGI (not BaseHTTPMiddleware), so streamed answers and disconnects pass untouched.
    """

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"
                and scope["path"].startswith(("/v1/", "/api/"))):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error(ApiError(401, "missing or wrong API key; send the header "
                                          "`Authorization: Bearer KEY`",
                                          code="invalid_api_key", type="authentication_error"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Relay:
    """A job's events from the decoding thread to the request's queue on the event loop,
    handed over once per engine step (`flush`, the engine's after_step): one wakeup of the
    loop for every stream's token of that step, where a wakeup per token cost a write to the
    loop's self-pipe and a thread switch each, and 8 streams made 8 a step."""

    def __init__(self) -> None:
        self._pending: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, tuple]] = []
        self._lock = threading.Lock()

    def sender(self, queue: asyncio.Queue) -> Callable[[tuple], None]:
        """The emit callback of a job whose events go to `queue` (on the running loop)."""
        loop = asyncio.get_running_loop()

        def emit(event: tuple) -> None:  # from the decoding thread
            with self._lock:
                self._pending.append((loop, queue, event))
        return emit

    def flush(self) -> None:
        """Deliver the events emitted since the last flush, one callback per loop."""
        with self._lock:
            pending, self._pending = self._pending, []
        loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]] = {}
        for loop, queue, event in pending:
            loops.setdefault(loop, []).append((queue, event))
        for loop, items in loops.items():
            with contextlib.suppress(RuntimeError):  # the loop is gone (server stopping)
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def report_html(dirs: list, names: list[str], x: str) -> str:
    """The report page of run dirs `dirs`, shown under the server's `names` for them."""
    cards = load_cards(dirs)
    for card, name in zip(cards, names, strict=True):
        card.name = card.metrics.name = name
    return render_report(cards, x, show_paths=False)


def error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread that ends with it (model loads: torch work off the event loop).
    A thread that outlives its torch work (asyncio.to_thread's pool) keeps its OpenMP thread
    team, and with more such threads than cores GNU OpenMP's threads sleep between parallel
    regions instead of spinning: the decoding thread's many small regions slow down (2-core
    Zen 3, one stream of generate_tokens: a 30M-parameter model 10-20% slower after a load in
    a pool thread; the README char model ~2x slower beside a thread that had run large ops).
    A team ends with its thread."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as e:  # handed to the awaiting request
            done.set_exception(e)
    threading.Thread(target=run, name="folio-load", daemon=True).start()
    return await asyncio.wrap_future(done)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes."""
    too_big = ApiError(413, f"the request body is larger than {limit} bytes",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    return bytes(body)


def watch_disconnect(receive: Callable[[], Awaitable[dict]], events: asyncio.Queue
                     ) -> asyncio.Future:
    """A task that puts ("gone",) among the job's events when the client disconnects (cancel
    it when the answer ends). One plain queue to wait on: a task and a wait per event cost
    the event loop ~50 us a token, which 8 batched streams pay 8 times a step."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        events.put_nowait(("gone",))
    return asyncio.ensure_future(watch())


async def drain(events: asyncio.Queue) -> list[tuple]:
    """The next event and every other one already queued (a step's are queued together)."""
    got = [await events.get()]
    while not events.empty():
        got.append(events.get_nowait())
    return got


async def collect(req: CompletionRequest, prompt_tokens: int, events: asyncio.Queue, job: Job,
                  request: Request) -> Response:
    """A non-streamed answer; a client that leaves while it is computed cancels it."""
    disconnected = watch_disconnect(request.receive, events)
    texts, reasons, used = [""] * req.n, ["length"] * req.n, 0
    try:
        while True:
            event = await events.get()
            if event[0] == "text":
                texts[event[1]] += event[2]
            elif event[0] == "end":
                reasons[event[1]], used = event[2], used + event[3]
            elif event[0] == "error":
                raise ApiError(500, event[1], type="server_error")
            elif event[0] == "gone":
                return Response(status_code=499)
            else:
                break
    finally:
        job.cancelled.set()  # a no-op once the job is done
        disconnected.cancel()
    return JSONResponse(api.completion(req, api.new_id(req.chat), api.now(), texts, reasons,
                                       api.usage(prompt_tokens, used)))


PLACEHOLDER = "\x00"  # stands for a text piece in a frame rendered once (JSON: "\u0000")


class ChunkWriter:
    """A request's events as server-sent `chunk` objects, ending with `data: [DONE]`."""

    def __init__(self, req: CompletionRequest, prompt_tokens: int) -> None:
        self.req, self.prompt_tokens, self.used = req, prompt_tokens, 0
        self.id, self.created = api.new_id(req.chat), api.now()
        self._around: dict[int, tuple[bytes, bytes]] = {}  # per choice: a text frame's ends

    def text(self, index: int, piece: str) -> bytes:
        """The frame of a piece of choice `index`'s text: the bytes of `sse(chunk(...))`,
        from that frame rendered once around a placeholder, the piece's JSON string put in
        its place (encoding the whole chunk for every token was a third of the event loop's
        work with 8 streams)."""
        if index not in self._around:
            frame = api.sse(api.chunk(self.req, self.id, self.created, index, PLACEHOLDER))
            head, _, tail = frame.partition(json.dumps(PLACEHOLDER).encode())
            self._around[index] = head, tail
        head, tail = self._around[index]
        return b"".join((head, json.dumps(piece).encode(), tail))

    def start(self) -> list[bytes]:
        if not self.req.chat:
            return []
        return [api.sse(api.chunk(self.req, self.id, self.created, i, "", role=True))
                for i in range(self.req.n)]  # OpenAI's first chat chunk names the role

    def frames(self, event: tuple) -> tuple[list[bytes], bool]:
        """The frames for one event, and whether the stream ends after them."""
        req = self.req
        if event[0] == "text":
            return [self.text(event[1], event[2])], False
        if event[0] == "end":
            self.used += event[3]
            return [api.sse(api.chunk(req, self.id, self.created, event[1], None,
                                      reason=event[2]))], False
        if event[0] == "error":
            return [api.sse(ApiError(500, event[1], type="server_error").body())], True
        tail = []
        if req.include_usage:
            tail.append(api.sse(api.usage_chunk(req, self.id, self.created,
                                                api.usage(self.prompt_tokens, self.used))))
        return [*tail, api.sse("[DONE]")], True


class EventStream(Response):
    """A text/event-stream response fed by a job's events; it cancels the job when the client
    disconnects, so the slot frees at the next token (and not when the answer would end)."""

    media_type = "text/event-stream"

    def __init__(self, writer: ChunkWriter, events: asyncio.Queue, job: Job) -> None:
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.writer, self.events, self.job = writer, events, job

    async def __call__(self, scope, receive, send) -> None:
        disconnected = watch_disconnect(receive, self.events)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            frames, done = self.writer.start(), False
            while True:
                if frames:  # a step's events of this job in one message
                    await send({"type": "http.response.body", "body": b"".join(frames),
                                "more_body": True})
                if done:
                    break
                frames = []
                for event in await drain(self.events):
                    if event[0] == "gone":
                        return
                    more, done = self.writer.frames(event)
                    frames += more
                    if done:
                        break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            pass
        finally:
            self.job.cancelled.set()  # a no-op once the job is done
            disconnected.cancel()


# ---------------------------------------------------------------------------- running

@contextlib.contextmanager
def background(cfg: ServeConfig) -> Iterator[str]:
    """A server for `cfg` in a thread of this process (for tests, notebooks); yields its base
    URL. `cfg.port` 0 picks a free port. Beside threads that ran large torch ops (and keep
    their OpenMP teams: see in_own_thread) it decodes slower than `folio serve` does."""
    import uvicorn
    sock = socket.create_server((cfg.host, cfg.port))
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def exposure_warning(cfg: ServeConfig) -> str | None:
    """The warning printed when the server listens beyond this machine without a key."""
    if cfg.host in ("127.0.0.1", "localhost", "::1") or cfg.api_key:
        return None
    return (f"folio: warning: serving on {cfg.host} without --api_key: anyone who can reach "
            "this machine can use the API and read the runs' configs")


def serve(cfg: ServeConfig) -> None:
    """`folio serve`: run the server in the foreground until Ctrl+C."""
    import uvicorn
    warning = exposure_warning(cfg)
    if warning:
        print(warning, file=sys.stderr)
    app = create_app(cfg)
    names = app.state.index.names()
    print(f"folio: serving {len(names)} run(s) ({', '.join(names[:5])}"
          f"{', ...' if len(names) > 5 else ''}) on http://{cfg.host}:{cfg.port}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
