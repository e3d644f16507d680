"""``neobert serve --model M``: an HTTP server for embeddings, fill-mask and classification.

Endpoints (JSON in and out; errors are ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status, the shape OpenAI's API returns):

* ``POST /v1/embeddings``: OpenAI-compatible. ``{"input": str | [str], "model": name,
  "encoding_format": "float" | "base64"}`` -> ``{"object": "list", "data": [{"object":
  "embedding", "index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``;
  base64 is the little-endian float32 bytes, as OpenAI's clients decode it.
* ``POST /fill-mask``: ``{"input": str | [str], "top_k": 5}`` (a masked-LM directory).
* ``POST /classify``: ``{"input": str | [str | [a, b]]}`` (a sequence-classification directory).
* ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text format).

Which of the model endpoints answer depends on the model directory (see
:mod:`neobert.serve_engine`); the others return 404 with the reason. Limits: request body
(413), texts per request and tokens per text (400), malformed requests (422), a full queue
(503). Concurrent requests are batched dynamically (``--max-batch-tokens``,
``--max-wait-ms``). SIGTERM or Ctrl-C stops accepting connections, lets the requests in
flight finish, and exits with status 0.
"""

# No `from __future__ import annotations`: FastAPI reads the request models of the
# handlers defined inside build_app from their real annotations.
import base64
import contextlib
import json
import signal
import socket
import time
from typing import Literal

from neobert.errors import UserError

# fastapi, pydantic and the model stack are imported in build_app/main, so that
# `neobert serve --help` answers without loading torch.

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error", 503: "server_busy"}


def error_json(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": status}}


class LimitsAndMetrics:
    """ASGI middleware: refuses bodies over ``max_body_bytes`` (413) and counts every request."""

    def __init__(self, app, max_body_bytes: int, metrics, paths: set[str]):
        self.app, self.max_body_bytes, self.metrics, self.paths = app, max_body_bytes, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"  # bounded label values
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await self._reply(send_status, 413, f"request body over the limit of {self.max_body_bytes} bytes (--max-body-bytes)")
                return
            replayed = False

            async def replay():  # the buffered body once, then the client's later messages (disconnect)
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_status)
        finally:
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None as soon as it is known to be over the limit."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _reply(send, status: int, message: str) -> None:
        body = json.dumps(error_json(status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def build_app(engine, *, name: str, max_batch_tokens: int = 1024, max_wait_ms: float = 2.0, max_texts: int = 256,
              max_tokens: int | None = None, max_body_bytes: int = 2**21, max_queue_texts: int = 4096):
    """The ASGI application serving ``engine`` (a :class:`neobert.serve_engine.Engine`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    from neobert.serve_engine import Batcher, Metrics, RequestError

    max_tokens = max_tokens or engine.max_length
    if max_tokens > engine.max_length:
        raise UserError(f"--max-tokens-per-text {max_tokens} is over the model's {engine.max_length} tokens")
    metrics = Metrics()
    batcher = Batcher(engine, metrics, max(max_batch_tokens, max_tokens), max_wait_ms, max_queue_texts)

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    class EmbeddingsRequest(Strict):
        input: str | list[str]
        model: str | None = None
        encoding_format: Literal["float", "base64"] = "float"
        user: str | None = None

    class FillMaskRequest(Strict):
        input: str | list[str]
        top_k: int = Field(5, ge=1, le=100)

    class ClassifyRequest(Strict):
        input: str | list[str | tuple[str, str]]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()  # uvicorn has already let every request in flight finish

    app = FastAPI(title="neobert", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse(error_json(e.status, e.message, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type:
            return JSONResponse(error_json(422, f"send a JSON body with Content-Type: application/json (got {content_type or 'none'!r})"), status_code=422)
        parts = []
        for err in e.errors()[:3]:
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            else:
                parts.append(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg', 'invalid')}")
        message = "; ".join(parts)
        first = e.errors()[0]
        where = None if first.get("type") == "json_invalid" else ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return JSONResponse(error_json(422, message, where), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(error_json(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception):  # a bug still answers in JSON; the server goes on
        return JSONResponse(error_json(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    async def run(task: str, inputs, options: dict | None = None) -> tuple[list, list[int]]:
        """Check the capability and the limits, then queue the texts; returns (results, token counts)."""
        reason = engine.missing(task)
        if reason:
            raise RequestError(404, reason)
        texts = [inputs] if isinstance(inputs, str) else [tuple(t) if isinstance(t, (list, tuple)) else t for t in inputs]
        if not texts:
            raise RequestError(400, "input is empty: give a string or a non-empty list", "input")
        if len(texts) > max_texts:
            raise RequestError(400, f"{len(texts)} texts in one request, over the limit of {max_texts} (--max-texts-per-request)", "input")
        ids = engine.tokenize(texts)
        tokens = [len(row) for row in ids]
        for i, n in enumerate(tokens):
            if n > max_tokens:
                raise RequestError(400, f"input[{i}] has {n} tokens, over the limit of {max_tokens} (--max-tokens-per-text)", "input")
        if task == "fill-mask":
            for i, text in enumerate(texts):
                if engine.tokenizer.mask_token not in text:
                    raise RequestError(400, f"input[{i}] has no {engine.tokenizer.mask_token} token to fill", "input")
        return await batcher.submit(task, texts, ids, options or {}), tokens

    # Handlers return JSONResponse themselves: FastAPI's jsonable_encoder walks every float
    # of an embedding in Python (0.5 ms for 128 floats, more than json.dumps of the whole body).

    def usage(tokens: list[int]) -> dict:
        return {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingsRequest):
        if req.model is not None and req.model != name:
            raise RequestError(404, f"model {req.model!r} is not served here; this server serves {name!r}", "model")
        vectors, tokens = await run("embeddings", req.input)
        if req.encoding_format == "base64":
            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = [v.tolist() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        return JSONResponse({"object": "list", "data": data, "model": name, "usage": usage(tokens)})

    @app.post("/fill-mask")
    async def fill_mask(req: FillMaskRequest):
        results, tokens = await run("fill-mask", req.input, {"top_k": req.top_k})
        return JSONResponse({"object": "list", "data": [{"index": i, "masks": r} for i, r in enumerate(results)], "model": name, "usage": usage(tokens)})

    @app.post("/classify")
    async def classify(req: ClassifyRequest):
        results, tokens = await run("classify", req.input)
        return JSONResponse({"object": "list", "data": [{"index": i, **r} for i, r in enumerate(results)], "model": name, "usage": usage(tokens)})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "capabilities": engine.capabilities, "dimensions": engine.dim, "max_tokens_per_text": max_tokens}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "neobert"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    paths = {"/v1/embeddings", "/fill-mask", "/classify", "/health", "/v1/models", "/metrics"}
    return LimitsAndMetrics(app, max_body_bytes, metrics, paths)


def main(argv: list[str]) -> int:
    """``neobert serve``: load the model, then serve until SIGTERM or Ctrl-C."""
    from neobert.cli import ArgumentParser

    parser = ArgumentParser(prog="neobert serve", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--model", required=True, help="model directory (masked LM, classifier, sentence-transformers, any encoder) or run dir")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", help="the model name in responses and the 'model' field to accept (default: the directory name)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="torch threads for the model (default: torch's, one per core)")
    parser.add_argument("--pooling", choices=["mean", "cls"], help="embedding pooling for plain HF encoders (default mean)")
    parser.add_argument("--max-batch-tokens", type=int, default=1024, help="padded tokens per model batch (default 1024: on CPU larger batches cost more per text; raise it on a GPU)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="longest a text waits for others to join its batch (default 2)")
    parser.add_argument("--max-texts-per-request", type=int, default=256, help="default 256")
    parser.add_argument("--max-tokens-per-text", type=int, help="default: the model's maximum length")
    parser.add_argument("--max-body-bytes", type=int, default=2**21, help="default 2 MiB")
    parser.add_argument("--max-queue-texts", type=int, default=4096, help="texts waiting for the model before 503 (default 4096)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    for flag in ("threads", "port", "max_batch_tokens", "max_texts_per_request", "max_body_bytes", "max_queue_texts"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")

    # Bind first: a busy port is a one-line error before minutes of model loading.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP; without it every keep-alive response waits 40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None

    import uvicorn

    import torch

    from neobert.serve_engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        engine = Engine(args.model, device=args.device, pooling=args.pooling)
        name = args.name or args.model.rstrip("/").rsplit("/", 1)[-1]
        app = build_app(
            engine, name=name, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
            max_texts=args.max_texts_per_request, max_tokens=args.max_tokens_per_text,
            max_body_bytes=args.max_body_bytes, max_queue_texts=args.max_queue_texts,
        )
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, lifespan="on"))
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler installed
    # before it: these no-op handlers make that graceful stop an ordinary exit (status 0).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 0
