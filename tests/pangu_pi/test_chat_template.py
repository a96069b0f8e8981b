"""The chat template: ChatML with Hermes-style tools, tool calls and tool results; upgrading folders."""

from __future__ import annotations

import json
import shutil

import pytest

from pangu_pi.cli import main as cli_main
from pangu_pi.tokenizer import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_V1,
    folder_chat_template,
    load_tokenizer,
    template_status,
    write_chat_template,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "rain"}'},
    {"role": "assistant", "content": "Rain."},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def render(tok, messages, tools=None, prompt=False, template=None):
    return tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=prompt, chat_template=template
    )


@pytest.mark.parametrize("prompt", [False, True])
def test_chats_without_tools_render_as_before(tok, prompt):
    chats = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a\nb"},
            {"role": "assistant", "content": "c"},
        ],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
    ]
    for messages in chats:
        assert render(tok, messages, prompt=prompt) == render(tok, messages, prompt=prompt, template=CHAT_TEMPLATE_V1)


def test_a_tool_conversation_renders_in_the_documented_format(tok):
    text = render(tok, CONVERSATION, TOOLS, prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\nYou may call one or more of these functions:\n<tools>\n"
        '{"name": "get_weather", "description": "Forecast", "parameters": ' + json.dumps(WEATHER) + "}\n"
        '{"name": "now", "parameters": {"type": "object", "properties": {}}}\n'
        "</tools>\nTo call a function, answer with its name and arguments as JSON:\n"
        '<tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>tool\n<tool_response id="call_1">\n{"sky": "rain"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nRain.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tools_without_a_system_message_get_a_system_turn(tok):
    text = render(tok, CONVERSATION[1:2], TOOLS, prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n") and text.count("<|im_start|>system") == 1
    assert text.endswith("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n")


def test_what_a_client_adds_does_not_change_the_prompt(tok):
    # vLLM passes tools as model_dump()s (nulls included) and tool-call arguments parsed to objects.
    dumped = [
        {"type": "function",
         "function": {**t["function"], "strict": None, "description": t["function"].get("description")}}
        for t in TOOLS
    ]
    parsed = [dict(m) for m in CONVERSATION]
    parsed_call = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    parsed[2] = {**parsed[2], "tool_calls": [parsed_call]}
    assert render(tok, parsed, dumped) == render(tok, CONVERSATION, TOOLS)


def test_content_and_several_calls(tok):
    calls = [CALL, {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "Checking.", "tool_calls": calls}]
    text = render(tok, messages)
    assert text.endswith(
        '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_each_turn_only_appends(tok):
    texts = [render(tok, CONVERSATION[:i], TOOLS) for i in range(1, len(CONVERSATION) + 1)]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    # The generation prompt is the start of the assistant's turn, so training and serving agree.
    assert texts[2].startswith(render(tok, CONVERSATION[:2], TOOLS, prompt=True))


def test_vllms_hermes_parser_reads_the_rendered_calls(tok):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    calls = [CALL, {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    head = render(tok, messages[:1], TOOLS, prompt=True)
    output = render(tok, messages, TOOLS)[len(head) :].removesuffix("<|im_end|>\n")  # what the model writes
    request = ChatCompletionRequest(model="m", messages=messages[:1], tools=TOOLS)
    found = Hermes2ProToolParser(tok).extract_tool_calls(output, request)
    assert found.tools_called
    assert [(c.function.name, json.loads(c.function.arguments)) for c in found.tool_calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("now", {}),
    ]


def test_folders_with_the_earlier_template_are_upgraded(tokenizer_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tokenizer_dir, old)
    (old / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE_V1)
    assert template_status(folder_chat_template(old)) == "previous"
    assert load_tokenizer(old).chat_template == CHAT_TEMPLATE  # so what is saved from it is current
    assert write_chat_template(old) == "previous"
    assert template_status(folder_chat_template(old)) == "current"
    assert write_chat_template(old) == "current"

    custom = tmp_path / "custom"
    shutil.copytree(tokenizer_dir, custom)
    (custom / CHAT_TEMPLATE_FILE).unlink()
    config = json.loads((custom / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    assert template_status(folder_chat_template(custom)) == "custom"
    assert write_chat_template(custom) == "custom"
    assert (custom / "chat_template.previous.jinja").read_text() == "{{ messages[0]['content'] }}"
    assert "chat_template" not in json.loads((custom / "tokenizer_config.json").read_text())
    assert load_tokenizer(custom).chat_template == CHAT_TEMPLATE

    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        write_chat_template(tmp_path)


def test_tokenizer_template_command(tokenizer_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tokenizer_dir, ckpt)
    (ckpt / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE_V1)
    assert cli_main(["tokenizer", "template", str(ckpt), "--check"]) == 1
    assert "previous chat template" in capsys.readouterr().out
    assert cli_main(["tokenizer", "template", str(ckpt)]) == 0
    assert "updated" in capsys.readouterr().out
    assert cli_main(["tokenizer", "template", str(ckpt), "--check"]) == 0
    assert (ckpt / CHAT_TEMPLATE_FILE).read_text() == CHAT_TEMPLATE
    assert cli_main(["tokenizer", "template", str(tmp_path / "nothing")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err


def test_an_extended_tokenizer_gets_the_current_template(tokenizer_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tokenizer_dir, base)
    (base / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE_V1)
    domain = tmp_path / "domain.txt"
    domain.write_text("".join(f"The amortization schedule of loan {i} lists collateral.\n" for i in range(50)))
    out = tmp_path / "extended"
    argv = ["tokenizer", "extend", "--base", str(base), "--input", str(domain), "--add", "4", "--out", str(out)]
    assert cli_main(argv) == 0
    assert folder_chat_template(out) == CHAT_TEMPLATE
