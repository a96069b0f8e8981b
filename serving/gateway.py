"""The gateway in front of several vLLM engines: one OpenAI endpoint, routed by the request's `model`.

A variant with its own tokenizer or weights (YunShan's extended vocabulary, say) cannot share an
engine with the base model, so each runs its own vLLM server on a loopback port and the gateway
forwards each request, streaming responses through chunk by chunk as the engine produces them.
The engines require an internal key that only the gateway holds, so nothing on the machine can
bypass the gateway's own key check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .request_guard import RequestGuard, openai_error

# Per-hop headers, and ones the gateway sets itself; everything else passes through.
_DROP_REQUEST_HEADERS = {"host", "authorization", "content-length", "connection", "keep-alive", "transfer-encoding"}
_DROP_RESPONSE_HEADERS = {"content-length", "connection", "keep-alive", "transfer-encoding"}


class Gateway:
    """Routes by `model` to the engine serving it; `engines` maps engine name → base URL."""

    def __init__(self, engines: dict[str, str], engine_key: str, default_engine: str, transport=None):
        self.transport = transport  # an httpx transport; None = the network
        self.engines = dict(engines)
        self.default_engine = default_engine
        self.engine_key = engine_key
        self.routes: dict[str, str] = {}  # model id (variant, LoRA adapter) → engine base URL
        self.client: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            # No read timeout: a long generation streams for as long as it takes. No pool cap below
            # the engines' own concurrency, so the gateway never queues requests the engines could run.
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=10.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                headers={"Authorization": f"Bearer {self.engine_key}"},
                transport=self.transport,
            )
        return self.client

    async def _engine_models(self, url: str) -> list[dict]:
        reply = await self._client().get(f"{url}/v1/models")
        reply.raise_for_status()
        return reply.json()["data"]

    async def refresh_routes(self) -> list[dict]:
        """Ask every engine what it serves (base model and LoRA adapters); returns the merged list."""
        urls = list(self.engines.values())
        listings = await asyncio.gather(*(self._engine_models(u) for u in urls))
        routes, models = {}, []
        for url, listing in zip(urls, listings):
            for model in listing:
                routes.setdefault(model["id"], url)
                models.append(model)
        self.routes = routes
        return models

    async def list_models(self, request: Request) -> Response:
        try:
            models = await self.refresh_routes()
        except httpx.HTTPError as err:
            return openai_error(502, f"an engine did not answer /v1/models: {err}", "api_error")
        return JSONResponse({"object": "list", "data": models})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return openai_error(400, f"The request body is not valid JSON ({err}); send a JSON object.")
        model = payload.get("model") if isinstance(payload, dict) else None
        if model is None:
            url = self.engines[self.default_engine]
        elif not isinstance(model, str):
            return openai_error(400, f"'model' must be a string, got {json.dumps(model)}.", param="model")
        else:
            url = self.routes.get(model)
            if url is None:  # an adapter loaded at runtime appears only after a refresh
                try:
                    await self.refresh_routes()
                except httpx.HTTPError:
                    pass
                url = self.routes.get(model)
            if url is None:
                known = ", ".join(sorted(self.routes)) or "none"
                return openai_error(
                    404,
                    f"The model `{model}` does not exist. Models served here: {known}.",
                    param="model",
                    code="model_not_found",
                )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
        upstream = self._client().build_request(
            request.method, f"{url}{request.url.path}", params=request.query_params, headers=headers, content=body
        )
        try:
            reply = await self._client().send(upstream, stream=True)
        except httpx.HTTPError as err:
            return openai_error(502, f"the engine serving `{model}` did not answer: {err}", "api_error")
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
        # Closing the upstream response when the client goes away makes the engine abort the request.
        return StreamingResponse(
            reply.aiter_raw(), status_code=reply.status_code, headers=out_headers, background=BackgroundTask(reply.aclose)
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def app(self, api_key: str | None):
        @contextlib.asynccontextmanager
        async def lifespan(app):
            await self.refresh_routes()
            yield
            await self.close()

        async def not_found(request: Request, exc) -> Response:
            return openai_error(404, f"no route {request.method} {request.url.path}", code="not_found")

        app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/completions", self.forward, methods=["POST"]),
                Route("/v1/chat/completions", self.forward, methods=["POST"]),
                Route("/tokenize", self.forward, methods=["POST"]),
                Route("/detokenize", self.forward, methods=["POST"]),
            ],
            lifespan=lifespan,
            exception_handlers={404: not_found, 405: not_found},
        )
        # An empty key (no --api-key) still goes through the guard: it checks JSON bodies too.
        return RequestGuard(app, api_key=api_key or "")
