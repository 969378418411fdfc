"""Serve a model over OpenAI's HTTP API, with a chat page: `slm serve CHECKPOINT`.

    slm serve data/models/tiny_final.pt                       # http://127.0.0.1:8000/
    SLM_API_KEY=secret slm serve final.pt --host 0.0.0.0 --port 8080

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as
server-sent events with `"stream": true`), and GET /, a small chat page. Concurrent requests are
generated together in one batch (`serve_engine.Engine`). With an API key every /v1 request must
send `Authorization: Bearer <key>` (401 otherwise); the key is never logged. A non-loopback --host
needs a key unless --insecure. On Modal, `modal deploy modal_app.py` serves the same app
(`app_from_volume`). Details and examples: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import socket
import time
from pathlib import Path

from src.errors import SLMError
from src.tools import serve_api as api
from src.tools.serve_api import APIError
from src.tools.serve_engine import Busy, Engine, Job, Params

PAGE = Path(__file__).with_name("serve_page.html")
MAX_BODY = 1 << 20  # bytes of a request body
KEY_ENV = "SLM_API_KEY"


# ----------------------------------------------------------------------------- finding the model


def find_model(root, run: str | None = None) -> Path:
    """The model to serve from a data root (the /data volume on Modal): run `run`'s
    models/<run>_final.pt (else its newest checkpoint), or the newest models/*_final.pt."""
    from src import checkpoint as ckpt
    from src.paths import RunLayout

    root = Path(root)
    finals = sorted(RunLayout(root, "").models_dir.glob("*_final.pt"),
                    key=lambda p: p.stat().st_mtime)
    have = ", ".join(p.name[: -len("_final.pt")] for p in finals) or "none"
    if run:
        lay = RunLayout(root, run)
        for p in (lay.model_final, lay.final):
            if p.is_file():
                return p
        steps = ckpt.step_files(lay.run_dir) if lay.run_dir.is_dir() else []
        if steps:
            return max(steps)[1]
        raise SLMError(f"no model of run '{run}' under {root}: neither models/{run}_final.pt nor "
                       f"checkpoints/{run}/; runs with a final model: {have}")
    if not finals:
        raise SLMError(f"no models/*_final.pt under {root}: train a model first, or name a run "
                       "whose checkpoints to serve")
    return finals[-1]


def app_from_volume(root, run: str | None = None, api_key: str | None = None, log=print, **kw):
    """The ASGI app Modal serves: the model found on the volume, behind the required API key."""
    if not api_key:
        raise SLMError(f"no API key: the deployed server needs {KEY_ENV} (on Modal, from the "
                       "secret named in modal_app.py)")
    path = find_model(root, run)
    log(f"model: {path}")
    return make_app(path, api_key, log=log, **kw)


# ----------------------------------------------------------------------------- access


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without an API key (unless told --insecure)."""
    if api_key is not None and not api_key.strip():
        raise SLMError(f"the API key is empty: give a real one with --api-key or {KEY_ENV}")
    if not is_loopback(host) and not api_key and not insecure:
        raise SLMError(f"--host {host} lets other machines reach the server: give an API key "
                       f"(--api-key KEY or the {KEY_ENV} environment variable), or pass "
                       "--insecure to serve without one")


def check_port(host: str, port: int) -> None:
    """A clear error before loading the model when the address cannot be listened on."""
    try:
        family, kind, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise SLMError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise SLMError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port "
                           "or stop what uses it") from None


def _check_key(request, api_key: str | None) -> None:
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             api_key.encode()):
        raise APIError(401, "missing or wrong API key: send the header "
                            "'Authorization: Bearer <key>'", code="invalid_api_key")


async def _read_json(request, limit: int) -> dict:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body is {int(size):,} bytes; the limit is {limit:,}",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body is over the limit of {limit:,} bytes",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


# ----------------------------------------------------------------------------- the app


class Server:
    """The model, its engine and the request handlers behind one ASGI app."""

    def __init__(self, model, tok, name: str, api_key: str | None, max_batch: int,
                 max_body: int, max_tokens: int | None, log):
        self.tok, self.name, self.api_key, self.log = tok, name, api_key, log
        self.block_size = model.cfg.block_size
        self.max_tokens = min(max_tokens or self.block_size, self.block_size)
        self.max_body, self.max_batch = max_body, max_batch
        self.engine = Engine(model, tok, max_batch=max_batch, log=log)
        self.chat_format = api.chat_format(tok)
        self.created = int(time.time())

    async def models(self, request):
        from starlette.responses import JSONResponse

        _check_key(request, self.api_key)
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "slm"}
        if "model" in request.path_params:
            self._check_model(request.path_params["model"])
            return JSONResponse(card)
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request):
        from starlette.concurrency import run_in_threadpool

        _check_key(request, self.api_key)
        req = api.parse(api.CompletionRequest, await _read_json(request, self.max_body))
        self._check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: give a string or a non-empty list of strings",
                           param="prompt")
        ids = await run_in_threadpool(lambda: [[self.tok.eot_id, *self.tok.encode(p)]
                                               for p in prompts])
        params = self._params(req, ids, req.max_tokens or 16, api.stops(req), "prompt")
        echo = prompts if req.echo else None
        return await self._answer(req, api.Shapes(False, self.name), ids, params, echo, {})

    async def chat(self, request):
        from starlette.concurrency import run_in_threadpool

        _check_key(request, self.api_key)
        req = api.parse(api.ChatRequest, await _read_json(request, self.max_body))
        self._check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages: give at least one message", param="messages")
        ids = [await run_in_threadpool(lambda: api.chat_ids(req.messages, self.tok))]
        plain = self.chat_format == "plain"
        stop = api.stops(req) + (api.PLAIN_STOPS if plain else ())
        room = max(self.block_size - len(ids[0]), 1)
        asked = req.max_completion_tokens or req.max_tokens
        params = self._params(req, ids, asked or min(api.DEFAULT_CHAT_TOKENS, room, self.max_tokens),
                              stop, "messages")
        headers = {"x-slm-chat-format": "plain (base model: see docs/serve.md)" if plain
                   else "template"}
        return await self._answer(req, api.Shapes(True, self.name), ids, params, None, headers)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"the model '{model}' does not exist here; this server serves "
                                f"'{self.name}' (GET /v1/models)", param="model",
                           code="model_not_found")

    def _params(self, req, ids, max_tokens: int, stop, what: str) -> Params:
        longest = max(len(i) for i in ids)
        if max_tokens > self.max_tokens:
            raise APIError(413, f"max_tokens {max_tokens} is above this server's limit of "
                                f"{self.max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        if longest + max_tokens > self.block_size:
            param = what if longest >= self.block_size else "max_tokens"
            raise APIError(413, f"the {what} ({longest} tokens) plus max_tokens ({max_tokens}) "
                                f"exceeds the model's context of {self.block_size} tokens",
                           param=param, code="context_length_exceeded")
        n = req.n or 1
        if n * len(ids) > self.max_batch:
            raise APIError(400, f"n x prompts = {n * len(ids)} choices; this server generates at "
                                f"most {self.max_batch} at once", param="n")
        temp = 1.0 if req.temperature is None else req.temperature
        return Params(max_tokens=max_tokens, temperature=temp, top_p=req.top_p or 1.0,
                      stop=tuple(stop), seed=req.seed, ignore_eos=bool(req.ignore_eos))

    async def _answer(self, req, shapes, ids, params, echo, headers):
        from starlette.responses import JSONResponse, StreamingResponse

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        n = req.n or 1

        def deliver(event):  # called from the engine's thread; never blocks
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone
                job.cancel()

        job = Job(ids, n, params, deliver)
        try:
            self.engine.submit(job)
        except Busy as e:
            raise APIError(503, f"the server is busy ({e}); retry shortly", code="overloaded") from None
        prompt_tokens = sum(len(i) for i in ids)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._stream(queue, job, shapes, n, prompt_tokens, usage, echo),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers})
        texts, finish, used = [""] * job.rows, [""] * job.rows, 0
        try:
            for ev in await self._collect(queue, job.rows):
                if ev[0] == "text":
                    texts[ev[1]] += ev[2]
                else:
                    finish[ev[1]], used = ev[2], used + ev[3]
        finally:
            job.cancel()
        if echo:
            texts = [echo[i // n] + t for i, t in enumerate(texts)]
        self.log(f"{shapes.id}: {prompt_tokens} prompt + {used} completion tokens")
        return JSONResponse(shapes.full(texts, finish, api.usage(prompt_tokens, used)),
                            headers=headers)

    @staticmethod
    async def _collect(queue, rows: int) -> list:
        events, left = [], rows
        while left:
            ev = await queue.get()
            if ev[0] == "error":
                raise APIError(500, ev[1], code="generation_failed")
            events.append(ev)
            left -= ev[0] == "end"
        return events

    async def _stream(self, queue, job, shapes, n, prompt_tokens, usage, echo):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        left, used = job.rows, 0
        try:
            for i in range(job.rows):  # the opening chunk: the role, or the echoed prompt
                if shapes.chat or echo:
                    yield sse(shapes.chunk(i, text=echo[i // n] if echo else None,
                                           role=shapes.chat))
            while left:
                ev = await queue.get()
                if ev[0] == "text":
                    yield sse(shapes.chunk(ev[1], text=ev[2]))
                elif ev[0] == "end":
                    yield sse(shapes.chunk(ev[1], finish=ev[2]))
                    left, used = left - 1, used + ev[3]
                else:
                    yield sse(APIError(500, ev[1], code="generation_failed").body())
                    return
            if usage:
                yield sse(shapes.usage_chunk(api.usage(prompt_tokens, used)))
            yield "data: [DONE]\n\n"
            self.log(f"{shapes.id}: {prompt_tokens} prompt + {used} completion tokens (streamed)")
        finally:
            job.cancel()  # finished, or the client went away: its rows leave the batch

    async def page(self, request):
        from starlette.responses import HTMLResponse

        csp = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
               "style-src 'self' 'unsafe-inline'; connect-src 'self'")
        return HTMLResponse(PAGE.read_text(encoding="utf-8"),
                            headers={"content-security-policy": csp})


def _error_handlers(log) -> dict:
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    def api_error(request, e: APIError):
        extra = {"www-authenticate": "Bearer"} if e.status == 401 else {}
        return JSONResponse(e.body(), status_code=e.status, headers=extra)

    def http_error(request, e: HTTPException):
        what = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code, e.detail)
        return api_error(request, APIError(e.status_code, f"{request.method} {request.url.path}: "
                                                          f"{what}", code=str(e.status_code)))

    def crash(request, e: Exception):
        log(f"error: {request.method} {request.url.path}: {type(e).__name__}: {e}")
        return api_error(request, APIError(500, f"internal error ({type(e).__name__})"))

    return {APIError: api_error, HTTPException: http_error, Exception: crash}


def make_app(checkpoint_path, api_key: str | None = None, device: str = "auto",
             dtype: str = "auto", log=print, **kw):
    """The ASGI app (Starlette) serving one checkpoint; `app.state.server` holds its parts.

    dtype: auto (bfloat16 on a CUDA GPU that has it, else float32), float32 or bfloat16.
    Other keywords go to `build_app` (max_batch, max_body, max_tokens).
    """
    import torch

    from src.checkpoint import load_model
    from src.hardware import native_bf16, resolve_device

    dev = resolve_device(device)
    model, tok, cfg = load_model(checkpoint_path, str(dev))
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and native_bf16(dev) else "float32"
    model = model.to(getattr(torch, dtype))
    for table in ("rope_cos", "rope_sin"):  # positions stay exact in float32 (as in training)
        if hasattr(model, table):
            setattr(model, table, getattr(model, table).float())
    return build_app(model, tok, cfg.get("name") or Path(checkpoint_path).stem, api_key, log=log, **kw)


def build_app(model, tok, name: str, api_key: str | None = None, max_batch: int = 16,
              max_body: int = MAX_BODY, max_tokens: int | None = None, log=print):
    """The ASGI app for a model already in memory (eval mode, on its device).

    max_tokens: the largest max_tokens a request may ask for (default: the model's context).
    """
    from starlette.applications import Starlette
    from starlette.routing import Route

    server = Server(model, tok, name, api_key, max_batch, max_body, max_tokens, log)
    p = next(model.parameters())
    log(f"model '{name}': {model.num_params() / 1e6:.1f}M parameters, context "
        f"{model.cfg.block_size} tokens, {p.device.type} {str(p.dtype).removeprefix('torch.')}, "
        f"up to {max_batch} sequences at once")
    if server.chat_format == "plain":
        log("chat: a base model; /v1/chat/completions renders messages as plain "
            "'User: ...' / 'Assistant:' text (docs/serve.md)")
    log("API key: " + ("required (Authorization: Bearer)" if api_key else "none"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.close()

    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers=_error_handlers(log), lifespan=lifespan)
    app.state.server = server
    return app


def serve(checkpoint, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          insecure: bool = False, device: str = "auto", max_batch: int = 16,
          max_tokens: int | None = None, log=print) -> None:
    """Run the server until interrupted (the `slm serve` command)."""
    import uvicorn

    api_key = api_key if api_key is not None else os.environ.get(KEY_ENV) or None
    check_access(host, api_key, insecure)  # (the numbers were ranged by the flags' parsers)
    if not Path(checkpoint).is_file():
        raise SLMError(f"{checkpoint} does not exist: give a model file (models/<name>_final.pt) "
                       "or a checkpoint")
    check_port(host, port)
    app = make_app(checkpoint, api_key, device=device, max_batch=max_batch,
                   max_tokens=max_tokens, log=log)
    shown = f"[{host}]" if ":" in host else host
    log(f"serving on http://{shown}:{port}/ (chat page) and http://{shown}:{port}/v1 (API); "
        "Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
