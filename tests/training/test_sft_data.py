"""Chat data for instruction tuning: loss masks, packing isolation, mixing, malformed-record accounting."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter

import pytest
import torch

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.tokenizer import load_tokenizer
from pangu_pi.training.sft_data import (
    IGNORE_INDEX,
    Example,
    MalformedRecord,
    PackedSFTDataset,
    block_causal_mask,
    check_messages,
    collate,
    materialise,
    mix,
    pack,
    read_chat_jsonl,
    render_example,
)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_only_assistant_words_and_their_end_of_turn_carry_loss(tokenizer):
    # The user says the very words the assistant answers with: only the assistant's copy may be learned.
    messages = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Say: the rate is 5%."},
        {"role": "assistant", "content": "the rate is 5%."},
        {"role": "user", "content": "Again, shorter."},
        {"role": "assistant", "content": "5%."},
    ]
    ex = render_example(tokenizer, messages)
    assert ex.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    labeled = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex.input_ids, ex.labels))
    assert tokenizer.decode(labeled) == "the rate is 5%.<|im_end|>5%.<|im_end|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    closing = [i for i, t in enumerate(ex.input_ids) if t == im_end]
    assert [ex.labels[i] != IGNORE_INDEX for i in closing] == [False, False, True, False, True]
    n_answer = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages[2::2])
    assert len(labeled) == n_answer + 2


def test_packed_loss_counts_assistant_tokens_only(tokenizer):
    torch.manual_seed(0)
    model = PanGuPiForCausalLM(
        PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), num_hidden_layers=1, siaf_backend="reference")
    ).eval()
    examples = [render_example(tokenizer, check_messages(chat(f"What is {i}% of 100?", f"{i}."))) for i in range(3)]
    row = materialise(examples, 96, tokenizer.pad_token_id)
    batch = collate([{k: torch.from_numpy(a) for k, a in zip(("input_ids", "labels", "position_ids"), row)}])
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[0, :-1], batch["labels"][0, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, manual)
    # What is learned is exactly the answers and their end-of-turn tokens.
    assert keep.sum() == sum(sum(lab != IGNORE_INDEX for lab in e.labels) for e in examples)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_examples_never_attend_to_each_other(tokenizer, backend):
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), num_hidden_layers=2, siaf_backend="reference")
    config._attn_implementation = backend
    model = PanGuPiForCausalLM(config).eval()
    a = render_example(tokenizer, check_messages(chat("Is a contract with a 16-year-old valid?", "No, it is void.")))
    b = render_example(tokenizer, check_messages(chat("What is 10% of 300?", "30.")))
    c = render_example(tokenizer, check_messages(chat("When is a claim time-barred?", "After the limit.")))
    seq_len = len(a) + len(b) + len(c) + 5

    def forward(first: Example, **call) -> torch.Tensor:
        row = materialise([first, b, c], seq_len, tokenizer.pad_token_id)
        batch = collate(
            [{k: torch.from_numpy(x) for k, x in zip(("input_ids", "labels", "position_ids"), row)}], backend
        )
        with torch.no_grad():
            return model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"],
                **call,
            ).logits[0]

    changed = Example([a.input_ids[0]] + torch.randint(10, len(tokenizer), (len(a) - 1,)).tolist(), a.labels)
    for call in ({}, {"use_cache": True}, {"use_cache": False}):
        before, after = forward(a, **call), forward(changed, **call)
        assert (before[: len(a)] - after[: len(a)]).abs().max() > 1e-3  # the perturbation is real
        # Every token of b, c and the padding sees exactly what it saw before: nothing of a.
        torch.testing.assert_close(before[len(a) :], after[len(a) :], rtol=0, atol=0)

    # Position ids restart at 0 for every example, so each is positioned as if alone.
    alone = render_example(tokenizer, check_messages(chat("What is 10% of 300?", "30.")))
    with torch.no_grad():
        single = model(input_ids=torch.tensor([alone.input_ids])).logits[0]
    torch.testing.assert_close(forward(a)[len(a) : len(a) + len(b)], single, rtol=1e-4, atol=1e-4)


def test_block_causal_mask_shape_and_blocks():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_causal_mask(positions)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert "attention_mask" not in collate(
        [{k: positions[0] for k in ("input_ids", "labels", "position_ids")}], "flash_attention_2"
    )


def test_malformed_records_are_counted_reported_and_not_fatal(tokenizer, tmp_path, caplog):
    good = [chat(f"Question {i}?", f"Answer {i}.") for i in range(5)]
    bad = [
        "{not json",
        {"prompt": "no messages here"},
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "boo"}]},
        {"messages": [{"role": "user", "content": "anyone?"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
        chat("long " * 400, "short"),
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", good[:2] + bad + good[2:])
    examples, stats = read_chat_jsonl(path, tokenizer, max_len=128)
    assert len(examples) == 5 and stats.kept == 5 and stats.read == 13
    assert stats.malformed == Counter(
        bad_json=1, no_messages=2, unknown_role=1, no_assistant_turn=2, too_long=1, bad_message=1
    )
    assert f"{path}:3" in stats.where["bad_json"][0]
    assert "wizard" in stats.where["unknown_role"][0]

    with caplog.at_level(logging.WARNING, logger="pangu_pi.training.sft_data"):
        data = PackedSFTDataset(path, tokenizer, seq_len=128)  # one path alone is one dataset
    assert data.stats["records"]["malformed"]["too_long"] == 1 and data.stats["examples"] == 5
    assert "unknown_role: 1" in caplog.text and "8 malformed" in caplog.text
    assert "8 malformed" in data.summary()

    only_bad = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(ValueError, match="no usable chat records"):
        PackedSFTDataset([only_bad], tokenizer, seq_len=128)
    with pytest.raises(MalformedRecord, match="unknown_role"):
        check_messages(bad[3])


def test_mixing_follows_the_weights(tokenizer, tmp_path):
    small = [Example([1, 100 + i], [IGNORE_INDEX, 100 + i], "small") for i in range(10)]
    large = [Example([1, 3, 4], [IGNORE_INDEX, 3, 4], "large") for _ in range(200)]
    mixture, drawn = mix([small, large], [3, 1], total=120, seed=0)
    assert Counter(e.source for e in mixture) == {"small": 90, "large": 30}
    assert drawn[0] == {"available": 10, "drawn": 90, "epochs": 9.0}
    # The small set is repeated whole: each of its examples appears exactly 9 times.
    assert set(Counter(e.input_ids[1] for e in mixture if e.source == "small").values()) == {9}
    assert [e.source for e in mixture] != sorted(e.source for e in mixture)  # shuffled together
    with pytest.raises(ValueError, match="positive"):
        mix([small, large], [1, 0])

    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"finance {i}?", "yes.") for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"general {i}?", "no.") for i in range(5)])
    data = PackedSFTDataset([{"path": a, "weight": 1}, {"path": b, "weight": 1}], tokenizer, seq_len=256, total=40)
    assert {k: v["drawn"] for k, v in data.stats["mixture"].items()} == {a: 20, b: 20}


def test_rows_are_full_length_and_hold_every_example_once(tokenizer, tmp_path):
    rows_in = [chat(f"How much is {i} plus {i}?" + " please" * (i % 7), f"{2 * i}.") for i in range(40)]
    path = write_jsonl(tmp_path / "c.jsonl", rows_in)
    data = PackedSFTDataset([path], tokenizer, seq_len=128, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (4, 128)
    assert batch["attention_mask"].shape == (4, 1, 128, 128) and batch["attention_mask"].dtype == torch.bool

    examples = [render_example(tokenizer, check_messages(r)) for r in rows_in]
    seen = Counter()
    for i in range(len(data)):
        item = data[i]
        starts = (item["position_ids"] == 0).nonzero().flatten().tolist() + [128]
        for s, e in itertools.pairwise(starts):
            seen[tuple(item["input_ids"][s:e].tolist())] += 1
    expected = Counter(tuple(e.input_ids) for e in examples)
    assert all(seen[k] == v for k, v in expected.items())  # each example once, never split
    assert data.stats["rows"] == len(data) and data.stats["fill"] > 0.8
    tokens = sum(map(len, examples))
    assert -(-tokens // 128) <= len(pack(examples, 128)) <= -(-tokens // 128) + 2  # best fit wastes little


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "percent_change",
            "description": "Percentage change from old to new",
            "parameters": {
                "type": "object",
                "properties": {"old": {"type": "number"}, "new": {"type": "number"}},
                "required": ["old", "new"],
            },
        },
    }
]


def tool_record(call_id: str = "call_1", arguments='{"old": 80, "new": 100}') -> dict:
    call = {"id": call_id, "type": "function", "function": {"name": "percent_change", "arguments": arguments}}
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Rent went from $80 to $100. By what percentage?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"percent": 25}'},
            {"role": "assistant", "content": "It rose by 25%."},
        ],
    }


def test_tool_calls_carry_loss_and_tool_results_do_not(tokenizer):
    record = tool_record()
    messages = check_messages(record)
    ex = render_example(tokenizer, messages, tools=record["tools"])
    # The tools are in the prompt, the tool result is in the text, and the ids are the template's.
    text = tokenizer.decode(ex.input_ids)
    assert "percent_change" in text.split("<|im_start|>user")[0] and '{"percent": 25}' in text
    rendered = tokenizer.apply_chat_template(messages, tools=record["tools"], tokenize=True, return_dict=True)
    assert ex.input_ids == rendered["input_ids"]
    labeled = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert labeled == (
        '<tool_call>\n{"name": "percent_change", "arguments": {"old": 80, "new": 100}}\n</tool_call><|im_end|>'
        "It rose by 25%.<|im_end|>"
    )
    # Arguments given as an object or as OpenAI's JSON string render (and train) the same.
    as_object = tool_record(arguments={"old": 80, "new": 100})
    assert render_example(tokenizer, check_messages(as_object), tools=TOOLS).input_ids == ex.input_ids


def test_malformed_tool_records_are_counted(tokenizer, tmp_path):
    good = tool_record()
    no_id = tool_record()
    del no_id["messages"][2]["tool_call_id"]
    wrong_id = tool_record()
    wrong_id["messages"][2]["tool_call_id"] = "call_9"
    orphan = {"messages": [{"role": "user", "content": "u"}, {"role": "tool", "tool_call_id": "x", "content": "1"},
                           {"role": "assistant", "content": "a"}]}  # fmt: skip
    bad_args = tool_record(arguments="{not json")
    list_args = tool_record(arguments="[1, 2]")
    bad_tools = {**tool_record(), "tools": [{"type": "function", "function": {"description": "no name"}}]}
    path = write_jsonl(tmp_path / "tools.jsonl", [good, no_id, wrong_id, orphan, bad_args, list_args, bad_tools])
    examples, stats = read_chat_jsonl(path, tokenizer, max_len=512)
    assert stats.kept == 1 and len(examples) == 1
    assert stats.malformed == Counter(bad_tool_message=3, bad_tool_call=2, bad_tools=1)
    assert "call_9" in " ".join(stats.where["bad_tool_message"])


def test_a_template_without_tools_is_refused_with_the_fix(tokenizer):
    from pangu_pi.tokenizer import CHAT_TEMPLATE, CHAT_TEMPLATE_V1

    tokenizer.chat_template = CHAT_TEMPLATE_V1.replace("message['content']", "(message['content'] or '')")
    try:
        with pytest.raises(ValueError, match="pangu-pi tokenizer template"):
            render_example(tokenizer, check_messages(tool_record()), tools=TOOLS)
    finally:
        tokenizer.chat_template = CHAT_TEMPLATE
