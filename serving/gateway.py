"""The gateway in front of the vLLM engines: one OpenAI endpoint, routed by the request's `model`.

A variant with its own tokenizer or weights (YunShan's extended vocabulary, say) cannot share an
engine with the base model, so each runs its own vLLM server on a loopback port and the gateway
forwards each request, streaming responses through chunk by chunk as the engine produces them.
The engines require an internal key that only the gateway holds, so nothing on the machine can
bypass the gateway's own key check and request limits.

Besides routing, the gateway
- answers for an engine that is down (a 503 at once, in OpenAI's format) while `pangu-pi serve`
  restarts it, and says on /health which engine is down and why;
- loads and unloads LoRA adapters at run time (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`,
  vLLM's routes and body, plus an optional `"variant"` naming the engine to hold the adapter), checks
  them against the engine's model first, and loads them again on an engine that was restarted;
- merges every engine's Prometheus metrics on /metrics, each sample labelled with its engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .adapters import AdapterProblem, check_adapter
from .request_guard import Limits, RequestGuard, openai_error

# Per-hop headers, and ones the gateway sets itself; everything else passes through.
_DROP_REQUEST_HEADERS = {"host", "authorization", "content-length", "connection", "keep-alive", "transfer-encoding"}
_DROP_RESPONSE_HEADERS = {"content-length", "connection", "keep-alive", "transfer-encoding"}
# What vLLM's API server says once its engine core is gone.
_ENGINE_DEAD = ("EngineDeadError", "EngineCore encountered an issue", "Engine loop is not running")
# Routes that take a `model` and go to the engine serving it.
FORWARDED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/tokenize", "/detokenize")


def _engine_down(engine, model, err) -> Response:
    """Refused or cut off: the engine's process is gone (the supervisor notices within a second)."""
    return openai_error(
        503,
        f"The engine serving `{model or engine.name}` is down ({engine.reason or err}); retry in a few seconds.",
        "server_error",
        code="engine_unavailable",
    )


def _engine_silent(engine, model, err) -> Response:
    return openai_error(502, f"the engine serving `{model or engine.name}` did not answer: {err}", "api_error")


@dataclass
class EngineState:
    """What the gateway knows of one engine: where it is, whether it is up, what it serves."""

    name: str
    url: str
    model_dir: Path | None = None
    max_lora_rank: int | None = 16
    status: str = "up"  # up, restarting, failed
    reason: str = ""  # why it went down, for /health and 503s
    restarts: int = 0
    down_since: float | None = None
    models: list[dict] = field(default_factory=list)  # its last /v1/models listing
    # Adapters loaded at run time (name → path) and start-up adapters unloaded at run time: what a
    # restarted engine must be told again to serve what it served before.
    loaded: dict[str, str] = field(default_factory=dict)
    unloaded: set[str] = field(default_factory=set)

    @property
    def up(self) -> bool:
        return self.status == "up"


class Gateway:
    """Routes by `model` to the engine serving it; `engines` maps engine name → base URL.

    `model_dirs` and `max_lora_rank` (engine name → value) let the gateway check adapters loaded at
    run time against the engine's model and `--max-lora-rank` before the engine sees them.
    """

    def __init__(
        self,
        engines: dict[str, str],
        engine_key: str,
        default_engine: str,
        transport=None,
        *,
        limits: Limits | None = None,
        model_dirs: dict[str, Path] | None = None,
        max_lora_rank: dict[str, int | None] | None = None,
    ):
        self.transport = transport  # an httpx transport; None = the network
        self.engines = {
            name: EngineState(
                name,
                url,
                model_dir=(model_dirs or {}).get(name),
                max_lora_rank=(max_lora_rank or {}).get(name, 16),
            )
            for name, url in engines.items()
        }
        self.default_engine = default_engine
        self.engine_key = engine_key
        self.limits = limits if limits is not None else Limits()
        self.routes: dict[str, str] = {}  # model id (variant, LoRA adapter) → engine name
        self.client: httpx.AsyncClient | None = None
        self.session = None  # aiohttp.ClientSession for forwarding, on the network (no transport)
        self.loop: asyncio.AbstractEventLoop | None = None  # set while serving; the supervisor calls in

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

    # ------------------------------------------------------------------------- engines going away

    def mark_down(self, name: str, reason: str, gave_up: bool = False) -> None:
        """Called by the supervisor (another thread) when an engine's process has exited."""
        engine = self.engines[name]
        engine.status = "failed" if gave_up else "restarting"
        engine.reason = reason
        if engine.down_since is None:
            engine.down_since = time.time()

    async def engine_back(self, name: str) -> list[str]:
        """A restarted engine is healthy: give it its run-time adapters again, then route to it.
        Returns the problems met (an adapter folder removed meanwhile, say)."""
        engine = self.engines[name]
        problems = []
        try:
            for lora_name, path in list(engine.loaded.items()):
                body = {"lora_name": lora_name, "lora_path": path}
                reply = await self._client().post(f"{engine.url}/v1/load_lora_adapter", json=body)
                if reply.status_code != 200:
                    problems.append(f"adapter {lora_name!r} ({path}) did not load again: {_message(reply)}")
                    engine.loaded.pop(lora_name)
            for lora_name in list(engine.unloaded):
                await self._client().post(f"{engine.url}/v1/unload_lora_adapter", json={"lora_name": lora_name})
        except httpx.HTTPError as err:  # it died again: the supervisor sees that next
            problems.append(f"could not restore its adapters: {err!r}")
        finally:
            self.mark_up(name)
        with contextlib.suppress(httpx.HTTPError):
            await self.refresh_routes()
        return problems

    def mark_up(self, name: str) -> None:
        engine = self.engines[name]
        engine.restarts += 1
        engine.status, engine.reason, engine.down_since = "up", "", None

    def _unavailable(self, engine: EngineState, model) -> Response:
        if engine.status == "failed":
            what = "was stopped after too many restarts; restart `pangu-pi serve`"
        else:
            what = "is restarting; retry in a few seconds"
        why = f" ({engine.reason})" if engine.reason else ""
        return openai_error(
            503,
            f"The engine serving `{model or engine.name}` is down{why} and {what}.",
            "server_error",
            code="engine_unavailable",
        )

    # ------------------------------------------------------------------------------------ routing

    async def _engine_models(self, engine: EngineState) -> list[dict]:
        reply = await self._client().get(f"{engine.url}/v1/models")
        reply.raise_for_status()
        return reply.json()["data"]

    async def refresh_routes(self) -> list[dict]:
        """Ask every engine that is up what it serves (base model and LoRA adapters); returns the
        merged list. An engine that is down keeps its last listing, so its models get a 503, not a 404."""
        engines = list(self.engines.values())
        listings = await asyncio.gather(
            *(self._engine_models(e) for e in engines if e.up), return_exceptions=True
        )
        failures = []
        for engine, listing in zip([e for e in engines if e.up], listings):
            if isinstance(listing, BaseException):
                failures.append(listing)
            else:
                engine.models = listing
        routes, models = {}, []
        for engine in engines:
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
        except httpx.HTTPError as err:
            return openai_error(502, f"an engine did not answer /v1/models: {err}", "api_error")
        return JSONResponse({"object": "list", "data": models})

    async def _route(self, model) -> EngineState | Response:
        if model is None:
            return self.engines[self.default_engine]
        if not isinstance(model, str):
            return openai_error(400, f"'model' must be a string, got {json.dumps(model)}.", param="model")
        name = self.routes.get(model)
        if name is None:  # an adapter loaded on an engine directly appears only after a refresh
            with contextlib.suppress(httpx.HTTPError):
                await self.refresh_routes()
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
        body = await request.body()
        payload = request.scope.get("state", {}).get("json_body")  # parsed by the guard in front
        if payload is None:
            try:
                payload = json.loads(body) if body else {}
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                return openai_error(400, f"The request body is not valid JSON ({err}); send a JSON object.")
        model = payload.get("model") if isinstance(payload, dict) else None
        engine = await self._route(model)
        if isinstance(engine, Response):
            return engine
        return await self._send(request, engine, model, body)

    async def _send(self, request: Request, engine: EngineState, model, body: bytes, path: str | None = None) -> Response:
        if not engine.up:
            return self._unavailable(engine, model)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
        if self.transport is None:
            return await self._send_aiohttp(request, engine, model, body, headers, path)
        upstream = self._client().build_request(
            request.method, f"{engine.url}{path or request.url.path}", params=request.query_params, headers=headers, content=body
        )
        try:
            reply = await self._client().send(upstream, stream=True)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as err:
            return _engine_down(engine, model, err)
        except httpx.HTTPError as err:
            return _engine_silent(engine, model, err)
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
        events = reply.headers.get("content-type", "").startswith("text/event-stream")
        if reply.status_code >= 500 and not events:
            text = (await reply.aread()).decode(errors="replace")
            await reply.aclose()
            return _server_error(text, reply.status_code, out_headers, model or engine.name)
        # Closing the upstream response when the client goes away makes the engine abort the request.
        return StreamingResponse(
            _relay(reply, events, model or engine.name),
            status_code=reply.status_code,
            headers=out_headers,
            background=BackgroundTask(reply.aclose),
        )

    def _session(self):
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
                headers={"Authorization": f"Bearer {self.engine_key}"},
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self.session

    async def _send_aiohttp(self, request: Request, engine: EngineState, model, body: bytes, headers: dict,
                            path: str | None) -> Response:  # fmt: skip
        """Forwarding on the network. aiohttp relays a stream for about a third of httpx's CPU per
        event, and the gateway shares the machine with the engines it forwards to."""
        import aiohttp

        url = f"{engine.url}{path or request.url.path}"
        try:
            reply = await self._session().request(
                request.method, url, params=list(request.query_params.multi_items()), headers=headers, data=body
            )
        except (aiohttp.ClientConnectionError, ConnectionError) as err:
            return _engine_down(engine, model, err)
        except aiohttp.ClientError as err:
            return _engine_silent(engine, model, err)
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
        events = reply.headers.get("content-type", "").startswith("text/event-stream")
        if reply.status >= 500 and not events:
            # vLLM's server answers 500 between its engine core dying and its own exit: that is an
            # engine that is down, and clients should retry, not give up.
            text = await reply.text(errors="replace")
            reply.release()
            return _server_error(text, reply.status, out_headers, model or engine.name)
        return _Relay(_relay_aiohttp(reply, events, model or engine.name), reply.status, out_headers, reply)

    # ----------------------------------------------------------------------- adapters at run time

    async def load_adapter(self, request: Request) -> Response:
        payload = await _json_object(request)
        if isinstance(payload, Response):
            return payload
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
        elif variant not in self.engines:
            return openai_error(
                400,
                f"'variant' is {json.dumps(variant)}, which is not an engine here; use one of {', '.join(self.engines)} "
                f"(or leave it out for {self.default_engine}).",
                param="variant",
            )
        else:
            engine = self.engines[variant]
        with contextlib.suppress(httpx.HTTPError):
            await self.refresh_routes()
        holder = self.routes.get(name)
        if holder is not None and (holder != engine.name or not payload.get("load_inplace")):
            return openai_error(
                400,
                f"A model named `{name}` is already served (by engine {holder}); unload it first or pick another lora_name.",
                param="lora_name",
            )
        try:
            check_adapter(Path(path), engine.model_dir, engine.max_lora_rank)
        except AdapterProblem as problem:
            return openai_error(400, f"Cannot load adapter `{name}`: {problem}.", param="lora_path", code="invalid_adapter")
        if not engine.up:
            return self._unavailable(engine, engine.name)
        reply = await self._client().post(f"{engine.url}/v1/load_lora_adapter", json=payload)
        if reply.status_code >= 500:
            # vLLM answers any failure to read the adapter with a 500; it is the adapter's fault.
            return openai_error(400, f"Cannot load adapter `{name}`: {_message(reply)}", param="lora_path", code="invalid_adapter")
        if reply.status_code == 200:
            engine.loaded[name] = str(Path(path).resolve())
            engine.unloaded.discard(name)
            with contextlib.suppress(httpx.HTTPError):
                await self.refresh_routes()
        return _copy(reply)

    async def unload_adapter(self, request: Request) -> Response:
        payload = await _json_object(request)
        if isinstance(payload, Response):
            return payload
        name = payload.get("lora_name")
        if not isinstance(name, str) or not name:
            return openai_error(400, "'lora_name' must be a non-empty string.", param="lora_name")
        payload.pop("variant", None)  # the adapter's engine is known
        with contextlib.suppress(httpx.HTTPError):
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
            return self._unavailable(engine, name)
        reply = await self._client().post(f"{engine.url}/v1/unload_lora_adapter", json=payload)
        if reply.status_code == 200:
            if engine.loaded.pop(name, None) is None:
                engine.unloaded.add(name)  # a start-up adapter: keep it unloaded across restarts
            with contextlib.suppress(httpx.HTTPError):
                await self.refresh_routes()
        return _copy(reply)

    # ------------------------------------------------------------------------- health and metrics

    async def health(self, request: Request) -> Response:
        engines = {
            e.name: {"status": e.status, **({"reason": e.reason} if e.reason else {}), "restarts": e.restarts,
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
            reply = await self._client().get(f"{engine.url}/metrics")
            reply.raise_for_status()
            return reply.text

        texts = await asyncio.gather(*(scrape(e) for e in up), return_exceptions=True)
        scraped = {e.name: t for e, t in zip(up, texts) if isinstance(t, str)}
        own = [
            "# HELP pangu_pi_engine_up Whether the engine answers (1) or is down (0).",
            "# TYPE pangu_pi_engine_up gauge",
            *(f'pangu_pi_engine_up{{engine="{e.name}"}} {int(e.name in scraped)}' for e in self.engines.values()),
            "# HELP pangu_pi_engine_restarts_total Restarts of the engine since `pangu-pi serve` started.",
            "# TYPE pangu_pi_engine_restarts_total counter",
            *(f'pangu_pi_engine_restarts_total{{engine="{e.name}"}} {e.restarts}' for e in self.engines.values()),
        ]
        body = merge_metrics(scraped) + "\n".join(own) + "\n"
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---------------------------------------------------------------------------------------- app

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.session is not None:
            await self.session.close()

    def app(self, api_key: str | None):
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.loop = asyncio.get_running_loop()
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
        # An empty key (no --api-key) still goes through the guard: it checks JSON bodies and limits.
        return RequestGuard(app, api_key=api_key or "", limits=self.limits)


# ------------------------------------------------------------------------------------------ helpers


async def _relay(reply: httpx.Response, events: bool, model: str):
    """The engine's body as it arrives; if the engine dies mid-stream, a stream ends with an error
    event (what OpenAI clients raise on) instead of a connection reset."""
    try:
        async for chunk in reply.aiter_raw():
            yield chunk
    except httpx.HTTPError as err:
        if not events:
            raise
        error = {"error": {"message": f"The engine serving `{model}` stopped mid-answer ({type(err).__name__}).",
                           "type": "server_error", "param": None, "code": "engine_unavailable"}}  # fmt: skip
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


async def _relay_aiohttp(reply, events: bool, model: str):
    import aiohttp

    try:
        async for chunk in reply.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, ConnectionError) as err:
        if not events:
            raise
        error = {"error": {"message": f"The engine serving `{model}` stopped mid-answer ({type(err).__name__}).",
                           "type": "server_error", "param": None, "code": "engine_unavailable"}}  # fmt: skip
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


class _Relay:
    """An ASGI response that sends each chunk as it comes, and closes the upstream reply at the end
    or when the client goes away (which makes the engine abort the request). Plainer than
    Starlette's StreamingResponse, which watches for the disconnect in a task of its own."""

    def __init__(self, chunks, status: int, headers: dict[str, str], reply):
        self.chunks, self.status, self.headers, self.reply = chunks, status, headers, reply

    async def __call__(self, scope, receive, send) -> None:
        done = False

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            # uvicorn also says "disconnect" once the response is complete: only a client that
            # left early drops the engine's connection (vLLM then aborts the request); otherwise
            # the connection goes back to the pool.
            if not done:
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
        finally:
            watcher.cancel()
            await self.chunks.aclose()
            self.reply.release()


def _server_error(text: str, status: int, headers: dict, model: str) -> Response:
    """An engine's 5xx, passed on; but vLLM's server answers 500 between its engine core dying and
    its own exit, and that is an engine that is down (503: clients retry instead of giving up)."""
    if any(sign in text for sign in _ENGINE_DEAD):
        return openai_error(
            503,
            f"The engine serving `{model}` is down (its engine core died); retry in a few seconds.",
            "server_error",
            code="engine_unavailable",
        )
    return Response(text.encode(), status_code=status, headers=headers)


async def _json_object(request: Request) -> dict | Response:
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return openai_error(400, f"The request body is not valid JSON ({err}); send a JSON object.")
    if not isinstance(payload, dict):
        return openai_error(400, "The request body must be a JSON object.")
    return payload


def _message(reply: httpx.Response) -> str:
    try:
        return reply.json()["error"]["message"]
    except Exception:  # not OpenAI-shaped: say what the engine said
        return reply.text.strip()[:500] or f"HTTP {reply.status_code}"


def _copy(reply: httpx.Response) -> Response:
    headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
    return Response(reply.content, status_code=reply.status_code, headers=headers)


def _label(sample: str, engine: str) -> str:
    """`name{a="b"} 1` → `name{engine="E",a="b"} 1`; `name 1` → `name{engine="E"} 1`."""
    engine = engine.replace("\\", "\\\\").replace('"', '\\"')
    brace, space = sample.find("{"), sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1 :]
        # vLLM labels its engine-core index `engine`; ours is the engine's name, so theirs is renamed.
        if rest.startswith('engine="'):
            rest = "vllm_" + rest
        rest = rest.replace(',engine="', ',vllm_engine="')
        sep = "" if rest.startswith("}") else ","
        return f'{sample[:brace]}{{engine="{engine}"{sep}{rest}'
    return f'{sample[:space]}{{engine="{engine}"}}{sample[space:]}'


def merge_metrics(texts: dict[str, str]) -> str:
    """Several engines' Prometheus text in one exposition: each metric family once (its HELP and
    TYPE from the first engine that has it), with the samples of every engine labelled `engine`."""
    families: dict[str, dict] = {}
    for engine, text in texts.items():
        current = None  # the family of the last HELP/TYPE: its samples follow it
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    families.setdefault(current, {"meta": {}, "samples": []})["meta"].setdefault(parts[1], line)
                continue
            name = line.split("{")[0].split(" ")[0]
            # A histogram's `_bucket`, `_sum`, `_count` belong to it; a sample of another name
            # without a header of its own is a family of its own.
            family = current if current is not None and name.startswith(current) else name
            families.setdefault(family, {"meta": {}, "samples": []})["samples"].append(_label(line, engine))
    out = []
    for family in families.values():
        out += [family["meta"][k] for k in ("HELP", "TYPE") if k in family["meta"]]
        out += family["samples"]
    return "\n".join(out) + ("\n" if out else "")
