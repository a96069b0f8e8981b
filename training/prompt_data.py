"""Prompts for online RL (GRPO): read, check, render.

Records are JSONL in the conversational prompt layout that TRL reads:

    {"prompt": [{"role": "user", "content": "What is 12 plus 30?"}], "answer": 42, ...}

`prompt` is the conversation so far (system, user, earlier assistant and tool turns, as in a chat
record; a bare string is one user turn) and may come with OpenAI `tools`, as a chat record does.
Every other field (`answer`, `schema`, `tool`, ...) is kept as it is and handed to the reward
functions beside each completion (training/rewards.py). The prompt is rendered with the
checkpoint's chat template with the assistant's header appended (`add_generation_prompt`), exactly
the text serving builds before the model answers.

A record that cannot be used is counted under its reason and reported, never silently dropped:
`bad_json`, `no_prompt`, `bad_message`, `unknown_role`, `prompt_ends_with_answer` (the last turn is
the assistant's: there is nothing left for the policy to answer), `too_long` (the prompt plus
`finetune.grpo.max_completion_length` does not fit `data.seq_len`), and the tool-use reasons of chat
records (`bad_tools`, `bad_tool_call`, `bad_tool_message`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .sft_data import DatasetSpec, MalformedRecord, RecordStats, _spec, check_messages, mix, read_records, record_tools

log = logging.getLogger(__name__)

LAYOUT = '{"prompt": [{"role": "user", "content": ...}], ...fields the rewards read, such as "answer"}'


@dataclass
class Prompt:
    prompt_ids: list[int]
    messages: list[dict]  # the prompt as checked (what reward functions receive as `prompts[i]`)
    fields: dict = field(default_factory=dict)  # the record's other fields, `tools` included
    source: str = ""


def check_prompt(record) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of a prompt record, each message checked as in a chat record, or MalformedRecord."""
    if not isinstance(record, dict):
        raise MalformedRecord("no_prompt", f"expected {LAYOUT}")
    prompt = record.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise MalformedRecord("no_prompt", f"no prompt; expected {LAYOUT}")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, dict):
        prompt = [prompt]
    if not isinstance(prompt, list):
        raise MalformedRecord("no_prompt", f"prompt must be a list of messages; expected {LAYOUT}")
    last = prompt[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        raise MalformedRecord("prompt_ends_with_answer", "the prompt's last turn is the assistant's; nothing to answer")
    # The chat checks want an answer to follow; a stand-in one is checked along and dropped.
    messages = check_messages({"messages": [*prompt, {"role": "assistant", "content": "."}]})[:-1]
    return messages, record_tools(record)


def render_prompt(tokenizer, record, max_prompt_len: int, source: str = "") -> Prompt:
    messages, tools = check_prompt(record)
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    for tool in tools or []:
        if tool["function"]["name"] not in text:
            raise ValueError("the tokenizer's chat template does not render `tools`; install pangu-pi's with "
                             "`pangu-pi tokenizer template DIR` (DIR: the tokenizer or checkpoint folder)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_len:
        raise MalformedRecord("too_long", f"{len(ids)} prompt tokens, at most {max_prompt_len} leave room for the "
                                          "completion in data.seq_len")
    fields = {k: v for k, v in record.items() if k != "prompt"}
    return Prompt(ids, messages, fields, source)


def read_prompt_jsonl(path, tokenizer, max_prompt_len: int, stats: RecordStats | None = None):
    stats = stats if stats is not None else RecordStats()
    return read_records(path, lambda record: render_prompt(tokenizer, record, max_prompt_len, str(path)), stats), stats


class PromptDataset:
    """Prompts from several JSONL datasets mixed by weight (`finetune.examples` per epoch, default:
    as many as there are). Item i is a `Prompt`; `stats` tells what was read, rejected and drawn."""

    def __init__(self, sources: Sequence[DatasetSpec | dict | str], tokenizer, max_prompt_len: int,
                 total: int | None = None, seed: int = 0):
        from pangu_pi.corpus import expand_inputs

        if isinstance(sources, str | Path | dict | DatasetSpec):
            sources = [sources]
        specs = [_spec(s) for s in sources]
        if not specs:
            raise ValueError("no datasets given; list at least one JSONL file of prompts")
        self.records = RecordStats()
        per_source, datasets = {}, []
        for spec in specs:
            prompts, stats = [], RecordStats()
            for path in expand_inputs([spec.path]):
                prompts += read_prompt_jsonl(path, tokenizer, max_prompt_len, stats)[0]
            if not prompts:
                reasons = ", ".join(f"{reason}: {n}" for reason, n in stats.malformed.most_common()) or "no records"
                raise ValueError(f"{spec.path}: no usable prompts ({stats.read} records read; {reasons}); each line "
                                 f"must be {LAYOUT}")
            per_source[spec.path] = stats.to_dict()
            self.records.merge(stats)
            datasets.append(prompts)
        if self.records.malformed:
            log.warning("malformed prompt records skipped: %s", self.records.report())
        self.prompts, drawn = mix(datasets, [s.weight for s in specs], total, seed)
        self.stats = {
            "records": self.records.to_dict(),
            "per_source": per_source,
            "mixture": {s.path: {"weight": s.weight, **d} for s, d in zip(specs, drawn)},
            "prompts": len(self.prompts),
            "prompt_tokens": sum(len(p.prompt_ids) for p in self.prompts),
        }

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(len(p.prompt_ids).to_bytes(4, "little"))
            h.update(bytes(str(p.prompt_ids), "utf-8"))
        return h.hexdigest()[:16]

    def summary(self) -> str:
        s = self.stats
        return f"{self.records.report()}\n{s['prompts']} prompts ({s['prompt_tokens']} prompt tokens)"
