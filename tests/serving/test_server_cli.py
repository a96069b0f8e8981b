"""`pangu-pi serve` before any engine starts: argument checks, the engines it plans, their command
lines and environments. (Starting real engines is test_server.py and test_gateway.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pangu_pi.cli import UserError
from pangu_pi.net import free_port
from pangu_pi.serving import engines as server
from pangu_pi.serving import kv_cache
from pangu_pi.serving.config import parse_args
from pangu_pi.serving.request_guard import API_KEY_ENV, LIMITS_ENV, Limits

PANGU_PI = str(Path(sys.executable).with_name("pangu-pi"))


def checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return path


def adapter(path: Path, rank: int) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank}))
    return path


def plan(argv, sockets=Path("/run/engines")):
    return server.plan_engines(parse_args(argv), sockets)


def test_a_missing_checkpoint_is_one_line_on_the_command_line(tmp_path):
    result = subprocess.run([PANGU_PI, "serve", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("pangu-pi serve: error:") and "config.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_single_engine_has_a_socket_in_the_private_folder(tmp_path):
    base = checkpoint(tmp_path / "pangu-1b")
    lora = adapter(tmp_path / "law", 8)
    engines = plan([str(base), "--lora", f"law={lora}", "--port", "9001"], tmp_path / "sockets")
    assert len(engines) == 1
    assert engines[0].name == "pangu-1b" and engines[0].socket.parent == tmp_path / "sockets"
    assert engines[0].loras == {"law": lora} and engines[0].state.startup_adapters == {"law"}


def test_variants_get_engines_on_sockets_of_their_own(tmp_path):
    base = checkpoint(tmp_path / "base")
    ys = checkpoint(tmp_path / "ys")
    engines = plan([str(base), "--name", "pangu", "--variant", f"yunshan={ys}", "--host", "0.0.0.0", "--port", "9002"])
    assert [e.name for e in engines] == ["pangu", "yunshan"]
    assert engines[0].socket != engines[1].socket and engines[1].state.startup_adapters == frozenset()


def test_the_socket_folder_is_private():
    import stat

    folder = server.private_folder("pangu-pi-test-")
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == __import__("os").geteuid()
        assert len(str(folder / "engine-0.sock")) < 100
    finally:
        folder.rmdir()


def test_a_log_dir_serve_did_not_create_is_refused_unless_forced(tmp_path):
    base = checkpoint(tmp_path / "base")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "important.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        server.prepare_log_dir(parse_args([str(base), "--log-dir", str(theirs)]))
    assert server.prepare_log_dir(parse_args([str(base), "--log-dir", str(theirs), "--force"])) == theirs
    assert (theirs / "important.txt").read_text() == "keep me"
    ours = server.prepare_log_dir(parse_args([str(base), "--log-dir", str(tmp_path / "new" / "logs")]))
    (ours / "pangu.log").write_text("an earlier run")
    assert server.prepare_log_dir(parse_args([str(base), "--log-dir", str(ours)])) == ours  # ours again: fine
    link = tmp_path / "link"
    link.symlink_to(ours)
    with pytest.raises(UserError, match="symlink"):
        server.prepare_log_dir(parse_args([str(base), "--log-dir", str(link)]))
    # The default is a new private folder each time, not a name another user could take first.
    first, second = (server.prepare_log_dir(parse_args([str(base)])) for _ in range(2))
    assert first != second and (first.stat().st_mode & 0o777) == 0o700
    first.rmdir(), second.rmdir()


@pytest.mark.parametrize(
    "extra, error, mentions",
    [
        (["--lora", "oops"], UserError, "NAME=DIR"),
        (["--variant", "=x"], UserError, "NAME=DIR"),
        (["--lora", "law={tmp}/missing"], FileNotFoundError, "adapter_config.json"),
        (["--variant", "ys={tmp}/missing"], FileNotFoundError, "config.json"),
        (["--name", "dup", "--variant", "dup={tmp}/base"], UserError, "unique"),
    ],
)
def test_bad_arguments_name_the_problem(tmp_path, extra, error, mentions):
    base = checkpoint(tmp_path / "base")
    with pytest.raises(error, match=mentions):
        plan([str(base), *(e.format(tmp=tmp_path) for e in extra)])


def test_a_variant_without_tokenizer_is_refused(tmp_path):
    base = checkpoint(tmp_path / "base")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        plan([str(base), "--variant", f"bare={bare}"])


def test_engine_command_line(tmp_path):
    base = checkpoint(tmp_path / "base")
    argv = [
        str(base),
        "--lora",
        f"a={adapter(tmp_path / 'a', 12)}",
        "--lora",
        f"b={adapter(tmp_path / 'b', 4)}",
        "--max-model-len",
        "1024",
        "--api-key",
        "secret",
        "-tp",
        "2",
        "--",
        "--enforce-eager",
    ]
    args = parse_args(argv)
    engines = server.plan_engines(args, tmp_path / "sockets")
    cmd = server.engine_command(engines[0], args)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--uds") + 1] == str(tmp_path / "sockets" / "engine-0.sock")
    assert "--port" not in cmd and "--host" not in cmd  # nothing listens on the network but the gateway
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert flag("--max-lora-rank") == "16"  # vLLM's next allowed rank above the largest adapter's 12
    assert flag("--max-loras") == "4" and flag("--max-model-len") == "1024" and flag("--tensor-parallel-size") == "2"
    assert flag("--middleware") == "pangu_pi.serving.request_guard.RequestGuard"
    assert cmd[cmd.index("--lora-modules") + 1 : cmd.index("--lora-modules") + 3] == [
        f"a={tmp_path / 'a'}",
        f"b={tmp_path / 'b'}",
    ]
    assert cmd[-1] == "--enforce-eager"
    assert "secret" not in " ".join(cmd), "the key must not be visible in the process list"


def test_engine_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "stale")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    env = server.engine_env("cpu", None)
    assert API_KEY_ENV not in env and env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"  # /v1/load_lora_adapter exists on the engine
    assert server.engine_env("cuda", "k")[API_KEY_ENV] == "k"
    monkeypatch.setenv("PANGU_PI_ADMIN_API_KEY", "admin")
    limited = server.engine_env("cpu", "k", limits_json=Limits(max_n=3).to_env())
    assert "PANGU_PI_ADMIN_API_KEY" not in limited and Limits(**json.loads(limited[LIMITS_ENV])).max_n == 3
    assert server.engine_env("cpu", "k", tensor_parallel_size=2)["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in server.engine_env("cuda", "k", tensor_parallel_size=2)
    with pytest.raises(UserError, match="cores"):
        server.cpu_thread_binding(8)


def test_detects_the_cpu_build_here():
    assert server.detect_device() == "cpu"


def test_chat_client_says_when_nothing_listens():
    port = free_port()
    result = subprocess.run(
        [PANGU_PI, "chat", "--url", f"http://127.0.0.1:{port}"], input="", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "cannot reach" in result.stderr and "pangu-pi serve" in result.stderr and "Traceback" not in result.stderr


def test_lora_is_on_for_run_time_adapters_unless_turned_off(tmp_path):
    base = checkpoint(tmp_path / "base")

    def command(*extra):
        args = parse_args([str(base), *extra])
        return server.engine_command(server.plan_engines(args, tmp_path)[0], args)

    plain = command()
    assert plain[plain.index("--max-lora-rank") + 1] == "16" and "--lora-modules" not in plain
    assert command("--max-lora-rank", "40")[command("--max-lora-rank", "40").index("--max-lora-rank") + 1] == "64"
    assert "--enable-lora" not in command("--no-runtime-lora")
    with pytest.raises(UserError, match="--max-lora-rank"):
        command("--max-lora-rank", "4096")


def test_limit_and_backpressure_flags_default_and_must_be_positive(tmp_path):
    base = checkpoint(tmp_path / "base")
    args = parse_args([str(base)])
    assert args.limits == Limits(16, 2 * 1024 * 1024, 16, 128, 64, 30.0)
    assert (args.max_concurrency, args.max_connections, args.header_timeout, args.queue_timeout) == (
        512,
        1024,
        10.0,
        30.0,
    )
    assert args.slots_per_engine == 256 and parse_args([str(base), "--", "--max-num-seqs", "8"]).slots_per_engine == 8
    raised = parse_args(
        [
            str(base),
            "--max-n",
            "64",
            "--max-body-bytes",
            "9000000",
            "--max-stop",
            "40",
            "--max-tools",
            "500",
            "--max-json-depth",
            "100",
            "--body-timeout",
            "5",
            "--max-concurrency",
            "3",
            "--engine-concurrency",
            "2",
        ]
    )
    assert raised.limits == Limits(64, 9_000_000, 40, 500, 100, 5.0)
    assert raised.max_concurrency == 3 and raised.slots_per_engine == 2
    for flag in ("--max-n", "--max-concurrency", "--header-timeout", "--max-json-depth"):
        with pytest.raises(UserError, match=flag):
            parse_args([str(base), flag, "0"])


def test_kv_cache_is_chosen_to_fit_free_memory_unless_set(tmp_path, monkeypatch):
    base = checkpoint(tmp_path / "base")
    (base / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "hidden_size": 2048,
                "max_position_embeddings": 2048,
                "dtype": "float32",
            }
        )
    )
    (base / "model.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.delenv(server.KV_CACHE_ENV, raising=False)
    args = parse_args([str(base), "--dtype", "float32"])
    engines = server.plan_engines(args, tmp_path)
    gib = 1 << 30
    monkeypatch.setattr(kv_cache, "node_memory", lambda: (64 * gib, 40 * gib))
    chosen, line = kv_cache.choose_kv_cache(engines, args, "cpu")
    # (40 GiB - 3 processes × 0.5 GiB) / 2, for a model whose 256 full contexts would need 192 GiB.
    assert chosen == 19 and "19 GiB" in line and "VLLM_CPU_KVCACHE_SPACE" in line
    small = parse_args([str(base), "--dtype", "float32", "--max-model-len", "128", "--", "--max-num-seqs", "8"])
    assert kv_cache.choose_kv_cache(engines, small, "cpu")[0] == 1  # 8 × 128 tokens need far less than a GiB
    monkeypatch.setattr(kv_cache, "node_memory", lambda: (8 * gib, 1 * gib))
    chosen, line = kv_cache.choose_kv_cache(engines, args, "cpu")
    assert chosen == 1 and "memory is short" in line
    assert kv_cache.choose_kv_cache(engines, args, "cuda") == (None, "")
    assert (
        kv_cache.choose_kv_cache(engines, parse_args([str(base), "--", "--gpu-memory-utilization", "0.5"]), "cpu")[0]
        is None
    )
    monkeypatch.setenv(server.KV_CACHE_ENV, "3")
    assert kv_cache.choose_kv_cache(engines, args, "cpu") == (None, "")


def test_root_cause_is_the_error_that_says_why_not_the_last_line():
    log = """(APIServer pid=1) WARNING 12-01 21:42:18 [system_utils.py:255] can cause `OSError: [Errno 24] Too many open files`.
(Worker pid=3) ERROR 12-01 21:43:02 [multiproc_executor.py:1063] Traceback (most recent call last):
(Worker pid=3) ERROR 12-01 21:43:02 [multiproc_executor.py:1063]     raise ValueError(
(Worker pid=3) ERROR 12-01 21:43:02 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (5.68/8.09 GiB) is less than requested memory for kv (100.0 GiB).
(EngineCore pid=2) ERROR 12-01 21:43:02 [core.py:1510] RuntimeError: Worker failed with error 'Available memory on node 0', please check the stack trace above for the root cause
Traceback (most recent call last):
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""  # noqa: E501 (real log lines, kept whole)
    assert server.root_cause(log.splitlines()) == (
        "ValueError: Available memory on node 0 (5.68/8.09 GiB) is less than requested memory for kv (100.0 GiB)."
    )
    assert server.root_cause(["RuntimeError: Engine core initialization failed. See root cause above."]).startswith(
        "RuntimeError"
    )
    assert server.root_cause(["nothing to see"]) is None


@pytest.mark.slow
def test_an_engine_that_cannot_start_is_one_line_naming_the_cause_and_the_log(base_dir, serve_env, tmp_path):
    env = {**serve_env, server.KV_CACHE_ENV: "100"}  # more KV cache than this machine has
    logs = tmp_path / "logs"
    result = subprocess.run(
        [
            PANGU_PI,
            "serve",
            str(base_dir),
            "--name",
            "pangu",
            "--port",
            str(free_port()),
            "--dtype",
            "float32",
            "--max-model-len",
            "128",
            "--log-dir",
            str(logs),
            "--",
            "--enforce-eager",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("pangu-pi serve: error:")]
    assert len(error) == 1, result.stderr[-3000:]
    assert "engine 'pangu' exited during startup" in error[0]
    assert "less than requested memory for kv (100.0 GiB)" in error[0], error[0]
    assert f"full log: {logs / 'pangu.log'}" in error[0]
    assert "Traceback" in (logs / "pangu.log").read_text()
    assert "Traceback" not in result.stdout
