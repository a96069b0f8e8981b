"""Tool calling and structured output through `pangu-pi serve`, with the stock openai client.

One server: the base model and a variant with a vocabulary of its own, each on its own engine
behind the gateway. The models are random, so every check that an answer is *valid* relies on
constrained decoding (a named or required tool choice, a JSON schema); for `auto`, `none` and a
conversation with a tool result the checks are that the request is answered in the right shape.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from serving_fixtures import start_server

pytestmark = pytest.mark.slow

KEY = "tools-key-5d1c"
MODELS = ["pangu", "yunshan"]  # the base model's engine, and a variant's engine behind the gateway

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
UNIT = {
    "type": "object",
    "properties": {"unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast for a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "set_unit", "parameters": UNIT}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Oslo for the next 3 days?"}]
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "level": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["ok", "level"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(base_dir, yunshan_dir, serve_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tools_server.log"
    running = start_server(
        [str(base_dir), "--name", "pangu", "--variant", f"yunshan={yunshan_dir}", "--max-model-len", "512"],
        serve_env,
        log,
        KEY,
    )
    yield running
    running.stop()
    running.kill_leftovers()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def chat(client, model: str, stream: bool, **body) -> dict:
    """One chat completion as {"content", "tool_calls": [{"name", "arguments"}], "finish_reason"},
    assembled from the stream's deltas when streaming."""
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 64, **body}
    if not stream:
        choice = client.chat.completions.create(**body).choices[0]
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls or []]
        return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason}
    content, calls, finish = [], {}, None
    for chunk in client.chat.completions.create(**body, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"name": "", "arguments": ""})
            if part.function is not None:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return {"content": "".join(content), "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish}


def named(function: str) -> dict:
    return {"type": "function", "function": {"name": function}}


def assert_valid_call(call: dict, name: str | None = None) -> None:
    if name is not None:
        assert call["name"] == name
    assert call["name"] in SCHEMAS, call
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["get_weather", "set_unit"])
def test_named_tool_choice_calls_that_function_with_valid_arguments(client, model, stream, name):
    reply = chat(client, model, stream, tools=TOOLS, tool_choice=named(name))
    assert len(reply["tool_calls"]) == 1, reply
    assert_valid_call(reply["tool_calls"][0], name)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
def test_required_tool_choice_calls_a_tool_with_valid_arguments(client, model, stream):
    reply = chat(client, model, stream, tools=TOOLS, tool_choice="required", max_tokens=128)
    assert reply["tool_calls"], reply
    for call in reply["tool_calls"]:
        assert_valid_call(call)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
def test_auto_and_none_answer(client, model, stream):
    auto = chat(client, model, stream, tools=TOOLS, tool_choice="auto", max_tokens=16)
    assert auto["finish_reason"] in ("stop", "length", "tool_calls")
    assert auto["content"] or auto["tool_calls"]
    for call in auto["tool_calls"]:  # whatever a random model writes, a parsed call names a known tool
        assert call["name"] in SCHEMAS
    none = chat(client, model, stream, tools=TOOLS, tool_choice="none", max_tokens=16)
    assert none["tool_calls"] == [] and none["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
def test_json_schema_output_parses_and_validates(client, model, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}
    reply = chat(client, model, stream, response_format=fmt)
    assert reply["finish_reason"] == "stop", reply  # compact JSON ends well within max_tokens
    jsonschema.validate(json.loads(reply["content"]), ANSWER_SCHEMA)
    assert " " not in reply["content"]  # no whitespace between tokens by default


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
def test_json_object_output_is_an_object(client, model, stream):
    reply = chat(client, model, stream, response_format={"type": "json_object"}, max_tokens=24)
    assert reply["content"].startswith("{"), reply
    if reply["finish_reason"] == "stop":
        assert isinstance(json.loads(reply["content"]), dict)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
def test_a_conversation_with_a_tool_result_is_answered(client, model, stream):
    arguments = '{"city": "Oslo", "days": 3}'
    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": '{"forecast": ["rain", "sun", "sun"]}'},
    ]
    reply = chat(client, model, stream, messages=messages, tools=TOOLS, max_tokens=16)
    assert reply["finish_reason"] in ("stop", "length", "tool_calls")
    assert reply["content"] or reply["tool_calls"]


@pytest.mark.parametrize("model", MODELS)
def test_the_prompt_is_pangu_pis_tool_template(server, model, base_dir, yunshan_dir):
    """What the engine renders for a request with tools is exactly the checkpoint's template."""
    import httpx

    from pangu_pi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(base_dir if model == "pangu" else yunshan_dir)
    body = {"model": model, "messages": QUESTION, "tools": TOOLS, "add_generation_prompt": True}
    reply = httpx.post(f"{server.url}/tokenize", json=body, headers=server.headers(), timeout=60)
    assert reply.status_code == 200, reply.text
    expected = tokenizer.apply_chat_template(QUESTION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tools>" in expected
    assert reply.json()["tokens"] == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_key_and_request_checks_stay_in_front(server, client):
    keyless = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.chat.completions.create(model="pangu", messages=QUESTION, tools=TOOLS, tool_choice="required")
    with pytest.raises(openai.BadRequestError):  # a named function that is not among the tools
        client.chat.completions.create(model="yunshan", messages=QUESTION, tools=TOOLS, tool_choice=named("nope"))
    with pytest.raises(openai.BadRequestError):  # a schema that is not a schema
        client.chat.completions.create(
            model="pangu",
            messages=QUESTION,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}},
        )
    reply = chat(client, "yunshan", False, tools=TOOLS, tool_choice=named("set_unit"))
    assert_valid_call(reply["tool_calls"][0], "set_unit")  # and it keeps serving


def test_engines_get_the_tool_parser_and_compact_json_unless_told_otherwise(base_dir, tmp_path):
    from pangu_pi.serving import engines as server
    from pangu_pi.serving.config import parse_args

    def command(*extra: str) -> list[str]:
        args = parse_args([str(base_dir), *extra])
        return server.engine_command(server.plan_engines(args, tmp_path)[0], args)

    default = command()
    assert default[default.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in default
    config = json.loads(default[default.index("--structured-outputs-config") + 1])
    assert config == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert server.engine_env("cpu", None)["VLLM_ENFORCE_STRICT_TOOL_CALLING"] == "0"
    off = command("--no-auto-tool-choice", "--json-whitespace")
    assert "--tool-call-parser" not in off and "--structured-outputs-config" not in off
    other = command("--tool-call-parser", "llama3_json")
    assert other[other.index("--tool-call-parser") + 1] == "llama3_json"
    # The user's own vLLM flags after `--` replace ours rather than clash with them.
    mine = command(
        "--",
        "--tool-call-parser",
        "pythonic",
        "--enable-auto-tool-choice",
        "--structured-outputs-config",
        '{"backend": "guidance"}',
    )
    assert mine.count("--tool-call-parser") == 1 and mine.count("--structured-outputs-config") == 1
