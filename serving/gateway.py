"""The gateway in front of the vLLM engines: one OpenAI endpoint, routed by the request's `model`.

A variant with its own tokenizer or weights (YunShan's extended vocabulary, say) cannot share an
engine with the base model, so each runs its own vLLM server and the gateway forwards each request,
streaming responses through chunk by chunk as the engine produces them. The engines listen on Unix
sockets in a folder only this user can enter and require an internal key that only the gateway
holds, so nothing on the machine can bypass the gateway's key check, limits and backpressure, or
stand in for an engine.

Besides routing, the gateway
- answers for an engine that is down (a 503 at once, in OpenAI's format) while `pangu-pi serve`
  restarts it, and says on /health which engine is down and why;
- pushes back: at most --max-concurrency requests in flight (429 with Retry-After beyond), at most
  --engine-concurrency per engine, for which a request waits at most --queue-timeout seconds;
- loads and unloads LoRA adapters at run time (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`,
  vLLM's routes and body, plus an optional `"variant"` naming the engine to hold the adapter), behind
  the admin key when one is set; checks them against the engine's model first, never lets the API
  unload or replace an adapter named at start-up, and loads them again on an engine that restarted;
- merges every engine's Prometheus metrics on /metrics, each sample labelled with its engine, with
  its own (engines up, restarts, requests refused by reason, requests in flight).

It forwards with aiohttp (a stream relayed for about a third of httpx's CPU per event: the gateway
shares the machine with the engines), on one client session per engine socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import aiohttp
from prometheus_client.metrics_core import Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .adapters import AdapterProblem, check_adapter
from .backpressure import RETRY_AFTER_S, ConcurrencyLimit, too_many
from .engine_state import EngineState
from .metrics import CONTENT_TYPE, GatewayCounters, merge_metrics
from .request_guard import Limits, RequestGuard, openai_error

# Per-hop headers, and ones the gateway sets itself; everything else passes through.
_DROP_REQUEST_HEADERS = {"host", "authorization", "content-length", "connection", "keep-alive", "transfer-encoding"}
_DROP_RESPONSE_HEADERS = {"content-length", "connection", "keep-alive", "transfer-encoding"}
# What vLLM's API server says once its engine core is gone.
_ENGINE_DEAD = ("EngineDeadError", "EngineCore encountered an issue", "Engine loop is not running")
# Routes that take a `model` and go to the engine serving it.
FORWARDED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/tokenize", "/detokenize")
ENGINE_ORIGIN = "http://engine"  # the Host of requests to an engine; the socket is what reaches it
CONTROL_TIMEOUT_S = 120.0  # listing models, scraping metrics, loading an adapter


def _say(message: str) -> None:
    print(f"pangu-pi serve: {message}", file=sys.stderr, flush=True)


def _unavailable(engine: EngineState, model, detail: str | None = None) -> Response:
    """The one answer for a request whose engine is down: 503, which OpenAI clients retry."""
    if engine.status == "failed":
        what = "was stopped after too many restarts; restart `pangu-pi serve`"
    else:
        what = "is restarting; retry in a few seconds"
    why = engine.reason or detail
    return openai_error(
        503,
        f"The engine serving `{model or engine.name}` is down{f' ({why})' if why else ''} and {what}.",
        "server_error",
        code="engine_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class _Reply:
    """An engine's whole answer to a control request (models, metrics, adapters)."""

    def __init__(self, status: int, body: bytes, headers):
        self.status, self.body, self.headers = status, body, headers

    def json(self):
        return json.loads(self.body)

    def message(self) -> str:
        try:
            return self.json()["error"]["message"]
        except Exception:  # not OpenAI-shaped: say what the engine said
            return self.body.decode(errors="replace").strip()[:500] or f"HTTP {self.status}"

    def response(self) -> Response:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
        return Response(self.body, status_code=self.status, headers=headers)


class Gateway:
    """Routes by `model` to the engine serving it. `engines` are the states the supervisor keeps;
    the gateway routes only to those that are up."""

    def __init__(
        self,
        engines: list[EngineState],
        engine_key: str,
        default_engine: str | None = None,
        *,
        limits: Limits | None = None,
        admin_key: str | None = None,
        max_concurrency: int | None = None,
        engine_concurrency: int | None = None,
        queue_timeout_s: float = 30.0,
    ):
        self.engines = {e.name: e for e in engines}
        self.default_engine = default_engine or engines[0].name
        self.engine_key = engine_key
        self.limits = limits if limits is not None else Limits()
        self.admin_key = admin_key
        self.max_concurrency = max_concurrency
        self.engine_concurrency = engine_concurrency
        self.queue_timeout_s = queue_timeout_s
        self.counters = GatewayCounters()
        self.routes: dict[str, str] = {}  # model id (variant, LoRA adapter) → engine name
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.slots: dict[str, asyncio.Semaphore] = {}
        self.adapter_lock = asyncio.Lock()  # a name's check and its load (or unload) are one step
        self._refreshing: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set while serving; the supervisor calls in

    # ------------------------------------------------------------------------------ engine client

    def _session(self, engine: EngineState) -> aiohttp.ClientSession:
        session = self.sessions.get(engine.name)
        if session is None or session.closed:
            # No read timeout: a long generation streams for as long as it takes. No pool cap: the
            # engine slots below bound what goes to an engine.
            session = self.sessions[engine.name] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(engine.socket), limit=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
                headers={"Authorization": f"Bearer {self.engine_key}"},
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return session

    async def _call(self, engine: EngineState, method: str, path: str, body: dict | None = None) -> _Reply:
        """A control request to an engine, answered whole. Raises aiohttp.ClientError, OSError, TimeoutError."""
        timeout = aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)
        async with self._session(engine).request(method, ENGINE_ORIGIN + path, json=body, timeout=timeout) as reply:
            return _Reply(reply.status, await reply.read(), reply.headers)

    # ------------------------------------------------------------------------- engines coming back

    async def engine_back(self, name: str) -> list[str]:
        """A restarted engine is healthy: give it its run-time adapters again, then route to it.
        Returns the problems met (an adapter folder removed meanwhile, say)."""
        engine = self.engines[name]
        problems = []
        try:
            for lora_name, path in list(engine.loaded.items()):
                reply = await self._call(
                    engine, "POST", "/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": path}
                )
                if reply.status != 200:
                    problems.append(f"adapter {lora_name!r} ({path}) did not load again: {reply.message()}")
                    engine.loaded.pop(lora_name)
        except (aiohttp.ClientError, OSError, TimeoutError) as err:  # it died again: the supervisor sees that next
            problems.append(f"could not restore its adapters: {err!r}")
        finally:
            engine.mark_up(restarted=True)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            await self.refresh_routes()
        return problems

    # ------------------------------------------------------------------------------------ routing

    async def _engine_models(self, engine: EngineState) -> list[dict]:
        reply = await self._call(engine, "GET", "/v1/models")
        if reply.status != 200:
            raise aiohttp.ClientResponseError(None, (), status=reply.status, message=reply.message())
        return reply.json()["data"]

    async def _shared_refresh(self) -> None:
        """A route refresh that concurrent callers share: a burst of requests for unknown models
        costs one /v1/models call per engine, not one per request."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh_routes())
        await asyncio.shield(self._refreshing)

    async def refresh_routes(self) -> list[dict]:
        """Ask every engine that is up what it serves (base model and LoRA adapters); returns the
        merged list. An engine that is down keeps its last listing, so its models get a 503, not a 404."""
        up = [e for e in self.engines.values() if e.up]
        listings = await asyncio.gather(*(self._engine_models(e) for e in up), return_exceptions=True)
        failures = []
        for engine, listing in zip(up, listings):
            if isinstance(listing, BaseException):
                failures.append(listing)
            else:
                engine.models = listing
        routes, models = {}, []
        for engine in self.engines.values():
            for model in engine.models:
                routes.setdefault(model["id"], engine.name)
                models.append(model)
        self.routes = routes
        if failures and not models:
            raise failures[0]
        return models

    async def list_models(self, request: Request) -> Response:
        try:
            models = await self.refresh_routes()
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            return openai_error(502, f"an engine did not answer /v1/models: {err!r}", "api_error")
        return JSONResponse({"object": "list", "data": models})

    async def _route(self, model) -> EngineState | Response:
        if model is None:
            return self.engines[self.default_engine]
        if not isinstance(model, str):
            return openai_error(400, f"'model' must be a string, got {json.dumps(model)[:80]}.", param="model")
        name = self.routes.get(model)
        if name is None:  # an adapter loaded on an engine directly appears only after a refresh
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await self._shared_refresh()
            name = self.routes.get(model)
        if name is None:
            known = ", ".join(sorted(self.routes)) or "none"
            return openai_error(
                404,
                f"The model `{model}` does not exist. Models served here: {known}.",
                param="model",
                code="model_not_found",
            )
        return self.engines[name]

    async def forward(self, request: Request) -> Response:
        payload = request.scope.get("state", {}).get("json_body")  # parsed and checked by the guard
        if not isinstance(payload, dict):
            return openai_error(400, "The request body must be a JSON object.")
        model = payload.get("model")
        engine = await self._route(model)
        if isinstance(engine, Response):
            return engine
        return await self._send(request, engine, model, await request.body())

    async def _send(self, request: Request, engine: EngineState, model, body: bytes) -> Response:
        if not engine.up:
            return _unavailable(engine, model)
        slot = self._slot(engine)
        if slot is not None:
            try:
                async with asyncio.timeout(self.queue_timeout_s):
                    await slot.acquire()
            except TimeoutError:
                self.counters.reject("engine_busy")
                return too_many(
                    f"The engine serving `{model or engine.name}` is busy ({self.engine_concurrency} requests, "
                    f"`pangu-pi serve --engine-concurrency`) and no slot freed within {self.queue_timeout_s:g} s "
                    f"(`--queue-timeout`); retry in {RETRY_AFTER_S} s.",
                    code="engine_busy",
                )
        try:
            response = await self._upstream(request, engine, model, body)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        return response if slot is None else _Releasing(response, slot.release)

    def _slot(self, engine: EngineState) -> asyncio.Semaphore | None:
        if self.engine_concurrency is None:
            return None
        if engine.name not in self.slots:
            self.slots[engine.name] = asyncio.Semaphore(self.engine_concurrency)
        return self.slots[engine.name]

    async def _upstream(self, request: Request, engine: EngineState, model, body: bytes) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
        try:
            reply = await self._session(engine).request(
                request.method, ENGINE_ORIGIN + request.url.path, params=list(request.query_params.multi_items()),
                headers=headers, data=body,
            )  # fmt: skip
        except (aiohttp.ClientConnectionError, OSError) as err:
            # Refused or cut off: the engine's process is gone (the supervisor notices within a second).
            return _unavailable(engine, model, type(err).__name__)
        except (aiohttp.ClientError, TimeoutError) as err:
            return openai_error(
                502, f"the engine serving `{model or engine.name}` did not answer: {err!r}", "api_error"
            )
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
        events = reply.headers.get("content-type", "").startswith("text/event-stream")
        if reply.status >= 500 and not events:
            text = await reply.text(errors="replace")
            reply.release()
            # vLLM's server answers 500 between its engine core dying and its own exit: that is an
            # engine that is down (503: clients retry instead of giving up).
            if any(sign in text for sign in _ENGINE_DEAD):
                return _unavailable(engine, model, "its engine core died")
            return Response(text.encode(), status_code=reply.status, headers=out_headers)
        return _Relay(_relay(reply, events, model or engine.name), reply.status, out_headers, reply)

    # ----------------------------------------------------------------------- adapters at run time

    def _startup_adapter(self, name: str) -> str | None:
        return next((e.name for e in self.engines.values() if name in e.startup_adapters), None)

    def _fixed(self, name: str) -> Response:
        return openai_error(
            403,
            f"`{name}` was named with --lora when the server started; it cannot be unloaded or replaced through "
            "the API (restart `pangu-pi serve` without it).",
            "permission_error",
            param="lora_name",
            code="startup_adapter",
        )

    def _not_loadable(self, name: str, path, detail: str) -> Response:
        # The caller learns nothing of the server's files (which paths exist, what they hold);
        # the operator reads the detail in the log.
        _say(f"adapter {name!r} from {path!r} refused: {detail}")
        return openai_error(
            400,
            f"Cannot load adapter `{name}`: lora_path is not a loadable adapter for this engine "
            "(the server's log says why).",
            param="lora_path",
            code="invalid_adapter",
        )

    async def load_adapter(self, request: Request) -> Response:
        # Under the lock, two loads of one name cannot both pass the "not served yet" check.
        async with self.adapter_lock:
            return await self._load_adapter(request)

    async def unload_adapter(self, request: Request) -> Response:
        async with self.adapter_lock:
            return await self._unload_adapter(request)

    async def _load_adapter(self, request: Request) -> Response:
        payload = dict(request.scope.get("state", {}).get("json_body") or {})
        name, path = payload.get("lora_name"), payload.get("lora_path")
        for field_name, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value.strip():
                return openai_error(
                    400, f"'{field_name}' must be a non-empty string; send {{\"lora_name\": ..., \"lora_path\": ...}}.",
                    param=field_name,
                )  # fmt: skip
        variant = payload.pop("variant", None)
        if variant is None:
            engine = self.engines[self.default_engine]
        elif not isinstance(variant, str) or variant not in self.engines:
            return openai_error(
                400,
                f"'variant' is {json.dumps(variant)[:80]}, which is not an engine here; use one of "
                f"{', '.join(self.engines)} (or leave it out for {self.default_engine}).",
                param="variant",
            )
        else:
            engine = self.engines[variant]
        if self._startup_adapter(name) is not None:
            return self._fixed(name)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            await self.refresh_routes()
        holder = self.routes.get(name)
        if holder is not None and (holder != engine.name or not payload.get("load_inplace")):
            return openai_error(
                400,
                f"A model named `{name}` is already served (by engine {holder}); unload it first or pick "
                "another lora_name.",
                param="lora_name",
            )
        try:
            check_adapter(Path(path), engine.model_dir, engine.max_lora_rank)
        except AdapterProblem as problem:
            return self._not_loadable(name, path, str(problem))
        if not engine.up:
            return _unavailable(engine, engine.name)
        try:
            reply = await self._call(engine, "POST", "/v1/load_lora_adapter", payload)
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            return _unavailable(engine, engine.name, type(err).__name__)
        if reply.status >= 500:
            # vLLM answers any failure to read the adapter with a 500; it is the adapter's fault.
            return self._not_loadable(name, path, f"the engine could not load it: {reply.message()}")
        if reply.status == 200:
            engine.loaded[name] = str(Path(path).resolve())
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await self.refresh_routes()
        return reply.response()

    async def _unload_adapter(self, request: Request) -> Response:
        payload = dict(request.scope.get("state", {}).get("json_body") or {})
        name = payload.get("lora_name")
        if not isinstance(name, str) or not name:
            return openai_error(400, "'lora_name' must be a non-empty string.", param="lora_name")
        payload.pop("variant", None)  # the adapter's engine is known
        if self._startup_adapter(name) is not None:
            return self._fixed(name)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            await self.refresh_routes()
        holder = self.routes.get(name)
        adapters = sorted(m["id"] for e in self.engines.values() for m in e.models if m.get("parent"))
        if holder is None or not any(m["id"] == name and m.get("parent") for m in self.engines[holder].models):
            return openai_error(
                404,
                f"No adapter named `{name}` is loaded. Adapters served here: {', '.join(adapters) or 'none'}.",
                param="lora_name",
                code="model_not_found",
            )
        engine = self.engines[holder]
        if not engine.up:
            return _unavailable(engine, name)
        try:
            reply = await self._call(engine, "POST", "/v1/unload_lora_adapter", payload)
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            return _unavailable(engine, name, type(err).__name__)
        if reply.status == 200:
            engine.loaded.pop(name, None)
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await self.refresh_routes()
        return reply.response()

    # ------------------------------------------------------------------------- health and metrics

    async def health(self, request: Request) -> Response:
        engines = {
            e.name: {"status": e.health, **({"reason": e.reason} if e.reason else {}), "restarts": e.restarts,
                     **({"down_for_s": round(time.time() - e.down_since, 1)} if e.down_since else {})}
            for e in self.engines.values()
        }  # fmt: skip
        down = [e.name for e in self.engines.values() if not e.up]
        if not down:
            return JSONResponse({"status": "ok", "engines": engines})
        return JSONResponse({"status": "degraded", "down": down, "engines": engines}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        up = [e for e in self.engines.values() if e.up]

        async def scrape(engine: EngineState) -> str:
            reply = await self._call(engine, "GET", "/metrics")
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}")
            return reply.body.decode()

        texts = await asyncio.gather(*(scrape(e) for e in up), return_exceptions=True)
        scraped = {e.name: t for e, t in zip(up, texts) if isinstance(t, str)}
        engine_up = Metric("pangu_pi_engine_up", "Whether the engine answers (1) or is down (0).", "gauge")
        restarts = Metric(
            "pangu_pi_engine_restarts", "Restarts of the engine since `pangu-pi serve` started.", "counter"
        )
        for e in self.engines.values():
            engine_up.add_sample("pangu_pi_engine_up", {"engine": e.name}, int(e.name in scraped))
            restarts.add_sample("pangu_pi_engine_restarts_total", {"engine": e.name}, e.restarts)
        try:
            body = merge_metrics(scraped, engine_up, restarts, *self.counters.families())
        except ValueError as err:  # an engine's text that does not parse: say so, serve ours
            _say(f"an engine's metrics did not parse ({err}); serving the gateway's own")
            body = merge_metrics({}, engine_up, restarts, *self.counters.families())
        return PlainTextResponse(body, media_type=CONTENT_TYPE)

    # ---------------------------------------------------------------------------------------- app

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.close()
        self.sessions = {}

    def app(self, api_key: str | None):
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.loop = asyncio.get_running_loop()
            self.slots = {}  # semaphores belong to the loop that serves
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await self.refresh_routes()
            yield
            self.loop = None
            await self.close()

        async def not_found(request: Request, exc) -> Response:
            return openai_error(404, f"no route {request.method} {request.url.path}", code="not_found")

        app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/load_lora_adapter", self.load_adapter, methods=["POST"]),
                Route("/v1/unload_lora_adapter", self.unload_adapter, methods=["POST"]),
                *(Route(path, self.forward, methods=["POST"]) for path in FORWARDED),
            ],
            lifespan=lifespan,
            exception_handlers={404: not_found, 405: not_found},
        )
        # An empty key (no --api-key) still goes through the guard: it checks bodies and limits.
        guarded = RequestGuard(app, api_key=api_key or "", limits=self.limits, admin_key=self.admin_key or "",
                               on_refusal=self.counters.reject)  # fmt: skip
        return ConcurrencyLimit(guarded, self.max_concurrency, self.counters)


# ------------------------------------------------------------------------------------------ helpers


async def _relay(reply, events: bool, model: str):
    """The engine's body as it arrives; if the engine dies mid-stream, a stream ends with an error
    event (what OpenAI clients raise on) instead of a connection reset."""
    try:
        async for chunk in reply.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, ConnectionError) as err:
        if not events:
            raise
        error = {"error": {"message": f"The engine serving `{model}` stopped mid-answer ({type(err).__name__}).",
                           "type": "server_error", "param": None, "code": "engine_unavailable"}}  # fmt: skip
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


class _Releasing:
    """A response that frees its engine slot once sent, or once its client went away."""

    def __init__(self, response, release):
        self.response, self.release = response, release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.release()


class _Relay:
    """An ASGI response that sends each chunk as it comes, and closes the upstream reply at the end
    or when the client goes away (which makes the engine abort the request). Plainer than
    Starlette's StreamingResponse, which watches for the disconnect in a task of its own."""

    def __init__(self, chunks, status: int, headers: dict[str, str], reply):
        self.chunks, self.status, self.headers, self.reply = chunks, status, headers, reply

    async def __call__(self, scope, receive, send) -> None:
        done = gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            # uvicorn also says "disconnect" once the response is complete: only a client that
            # left early drops the engine's connection (vLLM then aborts the request); otherwise
            # the connection goes back to the pool.
            if not done:
                gone = True
                self.reply.close()

        watcher = asyncio.ensure_future(watch())
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": raw})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            self.reply.close()
        except aiohttp.ClientError:
            if not gone:  # the engine's fault, not the client's leaving: let the server say so
                raise
        finally:
            watcher.cancel()
            await self.chunks.aclose()
            self.reply.release()
