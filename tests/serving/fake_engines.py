"""Stand-in engines for the gateway's fast tests: small ASGI apps served by uvicorn on Unix sockets,
in threads of the test process, so that the gateway forwards to them over the very client and
transport it uses in production (aiohttp on a Unix socket)."""

from __future__ import annotations

import inspect
import json
import threading
import time
from pathlib import Path

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pangu_pi.serving.engine_state import UP, EngineState
from pangu_pi.serving.gateway import Gateway


class FakeEngine:
    """`handle(request, body) -> Response` (sync or async) answering on `socket`; `seen` records
    (path, authorization, body) of every request."""

    def __init__(self, socket: Path, handle):
        self.socket, self.handle, self.seen = socket, handle, []

        async def app(scope, receive, send):
            request = Request(scope, receive)
            body = await request.body()
            self.seen.append((request.url.path, request.headers.get("authorization"), body))
            response = self.handle(request, body)
            if inspect.isawaitable(response):
                response = await response
            await response(scope, receive, send)

        self.server = uvicorn.Server(uvicorn.Config(app, uds=str(socket), log_level="critical", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "FakeEngine":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake engine did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def models_reply(*ids: str, parent: str | None = None) -> JSONResponse:
    data = [
        {"id": ids[0], "object": "model"},
        *({"id": i, "object": "model", "parent": parent or ids[0]} for i in ids[1:]),
    ]
    return JSONResponse({"object": "list", "data": data})


def echo_engine(name: str, *served: str):
    """An engine serving `served` (first the base model, then adapters) that answers a completion
    with its own name and the model asked for, streams three events when asked to, and refuses a
    negative max_tokens as vLLM does."""

    def handle(request: Request, body: bytes) -> Response:
        if request.url.path == "/v1/models":
            return models_reply(*served)
        if request.url.path == "/metrics":
            return Response(
                f'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name="{served[0]}"}} 0.0\n'
            )
        payload = json.loads(body)
        if payload.get("max_tokens", 1) < 0:
            error = {
                "message": "max_tokens must be at least 1",
                "type": "BadRequestError",
                "param": "max_tokens",
                "code": 400,
            }
            return JSONResponse({"error": error}, status_code=400)
        if payload.get("stream"):

            async def events():
                for i in range(3):
                    yield f"data: {json.dumps({'piece': i, 'engine': name})}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"engine": name, "model": payload.get("model")})

    return handle


def state(name: str, socket: Path, **fields) -> EngineState:
    engine = EngineState(name, socket, **fields)
    engine.status = UP
    return engine


def gateway_for(engines: dict[str, Path], **options) -> Gateway:
    """A gateway over engines (name → socket) that are up, the first the default."""
    return Gateway([state(n, s) for n, s in engines.items()], "inner-key", **options)
