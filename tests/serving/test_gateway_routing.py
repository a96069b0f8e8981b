"""The gateway's routing, streaming, errors, adapters and metrics against stand-in engines on Unix
sockets (fake_engines.py), over the same aiohttp client production uses; the real engines are
exercised in test_gateway.py."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from fake_engines import FakeEngine, echo_engine, gateway_for, models_reply, state
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.testclient import TestClient

from pangu_pi.serving.gateway import Gateway

AUTH = {"Authorization": "Bearer outer-key"}


@pytest.fixture
def sockets():
    folder = Path(tempfile.mkdtemp(prefix="gw-", dir="/tmp"))  # a Unix socket's path is at most 108 bytes
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def two_engines(sockets):
    with (
        FakeEngine(sockets / "a.sock", echo_engine("a", "base", "base-lora")) as a,
        FakeEngine(sockets / "b.sock", echo_engine("b", "yunshan")) as b,
    ):
        gateway = gateway_for({"base": a.socket, "yunshan": b.socket})
        with TestClient(gateway.app("outer-key")) as client:
            yield client, gateway, a, b


def test_routes_by_model_including_adapters_and_uses_the_inner_key(two_engines):
    c, _, a, b = two_engines
    for model, engine in (("base", "a"), ("base-lora", "a"), ("yunshan", "b")):
        answer = c.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=AUTH)
        assert answer.status_code == 200 and answer.json() == {"engine": engine, "model": model}
    assert c.post("/v1/chat/completions", json={"messages": []}, headers=AUTH).json()["engine"] == "a"
    assert {key for _, key, _ in a.seen + b.seen} == {"Bearer inner-key"}


def test_models_merges_every_engine(two_engines):
    c = two_engines[0]
    assert [m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]] == ["base", "base-lora", "yunshan"]


def test_unknown_model_is_404_naming_the_known_ones(two_engines):
    reply = two_engines[0].post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=AUTH)
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "yunshan" in error["message"]


def test_non_string_model_is_400(two_engines):
    reply = two_engines[0].post("/v1/completions", json={"model": 7, "prompt": "x"}, headers=AUTH)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model"


def test_engine_errors_pass_through_unchanged(two_engines):
    reply = two_engines[0].post("/v1/completions", json={"model": "yunshan", "max_tokens": -1}, headers=AUTH)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_streams_pass_through_as_server_sent_events(two_engines):
    with two_engines[0].stream(
        "POST", "/v1/completions", json={"model": "yunshan", "stream": True}, headers=AUTH
    ) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert [json.loads(line[5:])["piece"] for line in lines[:-1]] == [0, 1, 2]


def test_outer_key_is_required(two_engines):
    c = two_engines[0]
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer inner-key"}).status_code == 401
    assert c.get("/health").status_code == 200


def test_an_engine_that_does_not_answer_is_a_503(sockets):
    gateway = Gateway([state("base", sockets / "gone.sock", models=[{"id": "base"}])], "inner")
    with TestClient(gateway.app(None)) as c:
        reply = c.post("/v1/completions", json={"model": "base", "prompt": "x"})
    # Refused: the engine's process is gone, which is what 503 (not 502) says, and clients retry.
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_unavailable"
    assert "base" in reply.json()["error"]["message"] and reply.headers["retry-after"] == "1"


# ------------------------------------------------------------------------------ engines going down


def test_a_dead_engine_gets_503_while_the_others_serve_and_health_names_it(two_engines):
    c, gateway, _, b = two_engines
    assert c.get("/health").json()["status"] == "ok"
    gateway.engines["yunshan"].mark_down("killed by SIGKILL")
    asked = len(b.seen)
    reply = c.post("/v1/completions", json={"model": "yunshan", "prompt": "x"}, headers=AUTH)
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "engine_unavailable"
    assert "SIGKILL" in error["message"] and "restarting" in error["message"]
    assert c.post("/v1/completions", json={"model": "base", "prompt": "x"}, headers=AUTH).status_code == 200
    # Still listed (it comes back), and the engine that is down is not asked.
    assert "yunshan" in [m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]]
    assert len(b.seen) == asked
    health = c.get("/health")
    assert health.status_code == 503 and health.json()["down"] == ["yunshan"]
    assert health.json()["engines"]["yunshan"] == {
        "status": "restarting",
        "reason": "killed by SIGKILL",
        "restarts": 0,
        "down_for_s": health.json()["engines"]["yunshan"]["down_for_s"],
    }
    assert health.json()["engines"]["base"]["status"] == "up"
    gateway.engines["yunshan"].mark_down("exit code 1", gave_up=True)
    assert (
        "too many restarts"
        in c.post("/v1/completions", json={"model": "yunshan"}, headers=AUTH).json()["error"]["message"]
    )


def test_a_restarted_engine_gets_its_runtime_adapters_back(sockets):
    loads = []

    def handle(request, body):
        if request.url.path == "/v1/load_lora_adapter":
            loads.append(json.loads(body))
            return PlainTextResponse("Success")
        return models_reply("base")

    with FakeEngine(sockets / "a.sock", handle) as engine:
        gateway = gateway_for({"base": engine.socket})
        with TestClient(gateway.app(None)) as c:
            gateway.engines["base"].loaded["live"] = "/adapters/live"
            gateway.engines["base"].mark_down("killed by SIGKILL")
            assert c.get("/health").status_code == 503
            assert c.portal.call(gateway.engine_back, "base") == []
            assert loads == [{"lora_name": "live", "lora_path": "/adapters/live"}]
            health = c.get("/health").json()
            assert health["status"] == "ok" and health["engines"]["base"]["restarts"] == 1


def test_a_stream_cut_by_a_dying_engine_ends_with_an_error_event(sockets):
    def handle(request, body):
        if request.url.path == "/v1/models":
            return models_reply("base")

        async def dies():
            yield b'data: {"piece": 0}\n\n'
            raise RuntimeError("the engine core died")  # uvicorn drops the connection mid-body

        return StreamingResponse(dies(), media_type="text/event-stream")

    with (
        FakeEngine(sockets / "a.sock", handle) as engine,
        TestClient(gateway_for({"base": engine.socket}).app(None)) as c,
    ):
        with c.stream("POST", "/v1/completions", json={"model": "base", "stream": True}) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert json.loads(lines[0][5:]) == {"piece": 0}
    assert json.loads(lines[1][5:])["error"]["code"] == "engine_unavailable" and lines[-1] == "data: [DONE]"


def test_an_engine_whose_core_died_is_a_503_other_server_errors_pass_through(sockets):
    def handle(request, body):
        if request.url.path == "/v1/models":
            return models_reply("base")
        if json.loads(body)["prompt"] == "dead":
            message = "EngineCore encountered an issue. See stack trace (above) for the root cause."
            return JSONResponse(
                {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}}, 500
            )
        return JSONResponse(
            {"error": {"message": "something else", "type": "InternalServerError", "param": None, "code": 500}}, 500
        )

    with (
        FakeEngine(sockets / "a.sock", handle) as engine,
        TestClient(gateway_for({"base": engine.socket}).app(None)) as c,
    ):
        dead = c.post("/v1/completions", json={"model": "base", "prompt": "dead"})
        other = c.post("/v1/completions", json={"model": "base", "prompt": "x"})
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_unavailable"
    assert other.status_code == 500 and other.json()["error"]["message"] == "something else"


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_merge_every_engine_labelled_by_engine(sockets):
    text = {
        "a": "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="base"} 2.0\nprocess_cpu_seconds_total 7.5\n',
        "b": "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="yunshan"} 0.0\n',
    }

    def engine(name, model):
        def handle(request, body):
            if request.url.path == "/metrics":
                assert request.headers["authorization"] == "Bearer inner-key"
                return PlainTextResponse(text[name])
            return models_reply(model)

        return handle

    with (
        FakeEngine(sockets / "a.sock", engine("a", "base")) as a,
        FakeEngine(sockets / "b.sock", engine("b", "yunshan")) as b,
    ):
        gateway = gateway_for({"base": a.socket, "yunshan": b.socket})
        with TestClient(gateway.app("k")) as c:
            assert c.get("/metrics").status_code == 401
            body = c.get("/metrics", headers={"Authorization": "Bearer k"}).text
    lines = body.splitlines()
    assert lines.count("# TYPE vllm:num_requests_running gauge") == 1
    assert 'vllm:num_requests_running{engine="base",model_name="base",vllm_engine="0"} 2.0' in lines
    assert 'vllm:num_requests_running{engine="yunshan",model_name="yunshan",vllm_engine="0"} 0.0' in lines
    assert 'process_cpu_seconds_total{engine="base"} 7.5' in lines
    assert 'pangu_pi_engine_up{engine="yunshan"} 1.0' in lines
    assert 'pangu_pi_rejected_requests_total{reason="unauthorised"} 1.0' in lines
    # The family's samples follow its header, as Prometheus' text format requires.
    header = lines.index("# TYPE vllm:num_requests_running gauge")
    assert lines[header + 1].startswith("vllm:num_requests_running{") and lines[header + 2].startswith(
        "vllm:num_requests_running{"
    )


# ----------------------------------------------------------------------------- adapters at run time


def _model(path, hidden):
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(hidden, hidden)}, str(path / "model.safetensors"))
    return path


def _lora(path, hidden, rank=8):
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": rank}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(rank, hidden), f"{prefix}.lora_B.weight": torch.zeros(hidden, rank)},
        str(path / "adapter_model.safetensors"),
    )
    return path


def adapter_engine(served: list[str], asked: list):
    def handle(request, body):
        if request.url.path == "/v1/models":
            return models_reply(*served)
        payload = json.loads(body)
        asked.append((served[0], request.url.path, payload))
        if request.url.path == "/v1/load_lora_adapter":
            served.append(payload["lora_name"])
            return PlainTextResponse(f"Success: LoRA adapter '{payload['lora_name']}' added successfully.")
        if request.url.path == "/v1/unload_lora_adapter":
            served.remove(payload["lora_name"])
            return PlainTextResponse("Success")
        return JSONResponse({"engine": served[0]})

    return handle


def test_adapters_are_checked_then_loaded_on_the_named_engine_and_routed_there(sockets, tmp_path, capsys):
    asked = []
    with (
        FakeEngine(sockets / "a.sock", adapter_engine(["base"], asked)) as a,
        FakeEngine(sockets / "b.sock", adapter_engine(["yunshan"], asked)) as b,
    ):
        gateway = Gateway(
            [
                state("base", a.socket, model_dir=_model(tmp_path / "m", 16)),
                state("yunshan", b.socket, model_dir=_model(tmp_path / "y", 32)),
            ],
            "inner",
        )
        auth = {"Authorization": "Bearer k"}
        with TestClient(gateway.app("k")) as c:
            load = lambda **body: c.post("/v1/load_lora_adapter", json=body, headers=auth)  # noqa: E731
            assert c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"}).status_code == 401

            def refused(reply, logged=None, param="lora_path", mentions="not a loadable adapter"):
                assert reply.status_code == 400, reply.text
                assert mentions in reply.json()["error"]["message"] and reply.json()["error"]["param"] == param
                # The caller is not told what the server's files are; the operator's log is.
                assert str(tmp_path) not in reply.json()["error"]["message"]
                if logged:
                    assert logged in capsys.readouterr().err

            refused(load(lora_name="a", lora_path=str(tmp_path / "nowhere")), "does not exist")
            refused(load(lora_name="a", lora_path=str(tmp_path)), "no adapter_config.json")
            refused(load(lora_name="a", lora_path=str(_lora(tmp_path / "wide", 32))), "another shape")
            refused(load(lora_name="a", lora_path=str(_lora(tmp_path / "big", 16, rank=64))), "--max-lora-rank 64")
            refused(
                load(lora_name="a", lora_path=str(tmp_path / "wide"), variant="nope"),
                param="variant",
                mentions="yunshan",
            )
            refused(
                load(lora_name="yunshan", lora_path=str(tmp_path / "wide")),
                param="lora_name",
                mentions="already served",
            )
            refused(load(lora_path=str(tmp_path / "wide")), param="lora_name", mentions="lora_name")
            assert asked == [], "nothing invalid reaches an engine"

            assert load(lora_name="narrow", lora_path=str(_lora(tmp_path / "narrow", 16))).status_code == 200
            assert load(lora_name="wide", lora_path=str(tmp_path / "wide"), variant="yunshan").status_code == 200
            assert asked[-1] == (
                "yunshan",
                "/v1/load_lora_adapter",
                {"lora_name": "wide", "lora_path": str(tmp_path / "wide")},
            )
            ids = [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]]
            assert ids == ["base", "narrow", "yunshan", "wide"]
            for name, engine in (("narrow", "base"), ("wide", "yunshan")):
                assert c.post("/v1/completions", json={"model": name, "prompt": "x"}, headers=auth).json() == {
                    "engine": engine
                }
            assert gateway.engines["yunshan"].loaded == {"wide": str((tmp_path / "wide").resolve())}

            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "wide"}, headers=auth).status_code == 200
            assert asked[-1][:2] == ("yunshan", "/v1/unload_lora_adapter")
            missing = c.post("/v1/unload_lora_adapter", json={"lora_name": "wide"}, headers=auth)
            assert missing.status_code == 404 and "narrow" in missing.json()["error"]["message"]
            assert c.post("/v1/completions", json={"model": "wide", "prompt": "x"}, headers=auth).status_code == 404
            assert gateway.engines["yunshan"].loaded == {}


def test_the_admin_key_guards_adapters_and_startup_adapters_stay(sockets, tmp_path):
    asked = []
    with FakeEngine(sockets / "a.sock", adapter_engine(["base", "law"], asked)) as a:
        base = state("base", a.socket, model_dir=_model(tmp_path / "m", 16), startup_adapters=frozenset({"law"}))
        gateway = Gateway([base], "inner", admin_key="admin-key")
        user, admin = {"Authorization": "Bearer k"}, {"Authorization": "Bearer admin-key"}
        with TestClient(gateway.app("k")) as c:
            narrow = str(_lora(tmp_path / "narrow", 16))
            for path, body in (
                ("/v1/load_lora_adapter", {"lora_name": "n", "lora_path": narrow}),
                ("/v1/unload_lora_adapter", {"lora_name": "law"}),
            ):
                refused = c.post(path, json=body, headers=user)
                assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
                assert c.post(path, json=body).status_code == 401
            # The inference key still infers; the admin key loads; nobody unloads or replaces `law`.
            assert c.post("/v1/completions", json={"model": "law", "prompt": "x"}, headers=user).status_code == 200
            assert (
                c.post("/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": narrow}, headers=admin).status_code
                == 200
            )
            for path, body in (
                ("/v1/unload_lora_adapter", {"lora_name": "law"}),
                ("/v1/load_lora_adapter", {"lora_name": "law", "lora_path": narrow, "load_inplace": True}),
            ):
                fixed = c.post(path, json=body, headers=admin)
                assert fixed.status_code == 403 and fixed.json()["error"]["code"] == "startup_adapter"
            assert [p for _, p, _ in asked if "lora" in p] == ["/v1/load_lora_adapter"]


def test_a_malformed_adapter_is_a_400_not_a_500(sockets, tmp_path):
    with FakeEngine(sockets / "a.sock", adapter_engine(["base"], [])) as a:
        gateway = Gateway([state("base", a.socket, model_dir=_model(tmp_path / "m", 16))], "inner")
        with TestClient(gateway.app(None)) as c:
            for name, config, weights in (
                ("header", {"r": 8}, b"\xff" * 8 + b"{"),
                ("short", {"r": 8}, b"\x01"),
                ("json", {"r": 8}, (5).to_bytes(8, "little") + b"[1,2]"),
                ("config", [1, 2], None),
                ("rank", {"r": "x"}, None),
            ):
                folder = tmp_path / name
                folder.mkdir()
                (folder / "adapter_config.json").write_text(json.dumps(config))
                if weights is not None:
                    (folder / "adapter_model.safetensors").write_bytes(weights)
                reply = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
                assert reply.status_code == 400, (name, reply.text)
                assert reply.json()["error"]["code"] == "invalid_adapter"


def test_adapters_with_embeddings_of_another_vocabulary_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pangu_pi.serving.adapters import AdapterProblem, check_adapter

    model = tmp_path / "model"
    model.mkdir()
    save_file(
        {"model.embed_tokens.weight": torch.zeros(100, 16), "lm_head.weight": torch.zeros(100, 16)},
        str(model / "model.safetensors"),
    )

    def adapter(name, tensors):
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
        save_file(tensors, str(path / "adapter_model.safetensors"))
        return path

    fits = adapter(
        "fits",
        {
            "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 100),
            "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(16, 4),
        },
    )
    check_adapter(fits, model, 16)
    wider_vocab = adapter("vocab", {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 120)})
    with pytest.raises(AdapterProblem, match="vocabulary of 120, the served model's has 100"):
        check_adapter(wider_vocab, model, 16)
    saved_head = adapter("head", {"base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(120, 16)})
    with pytest.raises(AdapterProblem, match="lm_head"):
        check_adapter(saved_head, model, 16)
