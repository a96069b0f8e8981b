"""Preference pairs for DPO: read, render, check, mix and batch.

Records are JSONL in the conversational preference layout that TRL and LLaMA-Factory read:

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "the better answer"}],
     "rejected": [{"role": "assistant", "content": "the worse answer"}]}

`prompt` is the conversation so far (system, user, earlier assistant and tool turns, as in a chat
record); `chosen` and `rejected` are the assistant turn(s) that continue it. A bare string stands
for one message (a user turn in the prompt, an assistant turn in the answers), and a record may
carry OpenAI `tools` as a chat record does. Each side is rendered with the checkpoint's chat
template as prompt + answer, exactly as SFT renders a chat (training/sft_data.py), and labelled on
the answer's assistant turns only: the prompt, earlier assistant turns included, carries no loss.

A record that cannot be used is counted under its reason and reported, never silently dropped:
`bad_json`, `no_prompt`, `no_answer` (chosen or rejected missing or empty), `bad_message`,
`unknown_role`, `answer_not_assistant`, `identical_answers` (chosen renders to the same tokens as
rejected: nothing to prefer), `too_long` (prompt + answer over `data.seq_len`; truncating would cut
off the very tokens the pair is about), and the tool-use reasons of chat records.

A batch of n pairs is 2n rows, the n chosen sides then the n rejected ones, right-padded to the
longest row; `index` names each pair, for the reference log-probabilities stored with the run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .sft_data import (
    IGNORE_INDEX,
    DatasetSpec,
    Example,
    MalformedRecord,
    RecordStats,
    _spec,
    check_messages,
    mix,
    read_records,
    record_tools,
    render_example,
)

log = logging.getLogger(__name__)

LAYOUT = ('{"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}], '
          '"rejected": [{"role": "assistant", "content": ...}]}')


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    source: str = ""


def _messages(value, default_role: str, field: str) -> list:
    """A record's prompt/chosen/rejected as a list of message dicts (a string is one message)."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise MalformedRecord("no_prompt" if field == "prompt" else "no_answer", f"{field} must be a list of messages")


def check_pair(record) -> tuple[list[dict], list[dict], list[dict], list[dict] | None]:
    """(prompt, chosen, rejected, tools) of a preference record, each side checked as a chat, or MalformedRecord."""
    if not isinstance(record, dict):
        raise MalformedRecord("no_prompt", f"expected {LAYOUT}")
    prompt = record.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise MalformedRecord("no_prompt", f"no prompt; expected {LAYOUT}")
    prompt = _messages(prompt, "user", "prompt")
    sides = []
    for field in ("chosen", "rejected"):
        answer = record.get(field)
        if answer is None or answer == "" or answer == []:
            raise MalformedRecord("no_answer", f"no {field!r} answer; expected {LAYOUT}")
        answer = _messages(answer, "assistant", field)
        if any(not isinstance(m, dict) or m.get("role") != "assistant" for m in answer[-1:]):
            raise MalformedRecord("answer_not_assistant", f"{field!r} must end with an assistant message")
        sides.append(answer)
    tools = record_tools(record)
    checked = []
    for answer in sides:
        messages = check_messages({"messages": prompt + answer})
        if len(messages) != len(prompt) + len(answer):
            raise MalformedRecord("answer_not_assistant", "an answer must end with an assistant message")
        checked.append(messages)
    return prompt, checked[0], checked[1], tools


def render_pair(tokenizer, record, max_len: int, source: str = "") -> Pair:
    prompt, chosen, rejected, tools = check_pair(record)
    k = len(prompt)
    c = render_example(tokenizer, chosen, max_len, source, tools, label_from=k)
    r = render_example(tokenizer, rejected, max_len, source, tools, label_from=k)
    if c.input_ids == r.input_ids:
        raise MalformedRecord("identical_answers", "chosen and rejected are the same answer; nothing to prefer")
    return Pair(c, r, source)


def read_preference_jsonl(path, tokenizer, max_len: int,
                          stats: RecordStats | None = None) -> tuple[list[Pair], RecordStats]:
    stats = stats if stats is not None else RecordStats()
    return read_records(path, lambda record: render_pair(tokenizer, record, max_len, str(path)), stats), stats


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs from several JSONL datasets mixed by weight (`finetune.examples` pairs per
    epoch, default: as many as there are). Item i is {chosen_ids, chosen_labels, rejected_ids,
    rejected_labels, index}; batch items with `collate_pairs`."""

    def __init__(self, sources: Sequence[DatasetSpec | dict | str], tokenizer, seq_len: int,
                 total: int | None = None, seed: int = 0):
        from pangu_pi.corpus import expand_inputs

        if isinstance(sources, str | Path | dict | DatasetSpec):
            sources = [sources]
        specs = [_spec(s) for s in sources]
        if not specs:
            raise ValueError("no datasets given; list at least one JSONL file of preference pairs")
        self.seq_len = seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.records = RecordStats()
        per_source, datasets = {}, []
        for spec in specs:
            pairs, stats = [], RecordStats()
            for path in expand_inputs([spec.path]):
                pairs += read_preference_jsonl(path, tokenizer, seq_len, stats)[0]
            if not pairs:
                raise ValueError(f"{spec.path}: no usable preference pairs ({stats.report()}); each line must be "
                                 f"{LAYOUT}")
            per_source[spec.path] = stats.to_dict()
            self.records.merge(stats)
            datasets.append(pairs)
        if self.records.malformed:
            log.warning("malformed preference records skipped: %s", self.records.report())
        self.pairs, drawn = mix(datasets, [s.weight for s in specs], total, seed)
        self.stats = {
            "records": self.records.to_dict(),
            "per_source": per_source,
            "mixture": {s.path: {"weight": s.weight, **d} for s, d in zip(specs, drawn)},
            "pairs": len(self.pairs),
            "answer_tokens": sum(_answer_tokens(p.chosen) + _answer_tokens(p.rejected) for p in self.pairs),
        }

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        return {"chosen_ids": p.chosen.input_ids, "chosen_labels": p.chosen.labels,
                "rejected_ids": p.rejected.input_ids, "rejected_labels": p.rejected.labels, "index": i}

    def fingerprint(self) -> str:
        """A digest of every pair's tokens, in order: reference log-probs stored with a run belong to this."""
        h = hashlib.sha256()
        for p in self.pairs:
            for ex in (p.chosen, p.rejected):
                h.update(len(ex.input_ids).to_bytes(4, "little"))
                h.update(torch.tensor(ex.input_ids + ex.labels, dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        s = self.stats
        return f"{self.records.report()}\n{s['pairs']} preference pairs ({s['answer_tokens']} answer tokens with loss)"


def _answer_tokens(ex: Example) -> int:
    return sum(1 for x in ex.labels if x != IGNORE_INDEX)


def collate_pairs(items: Sequence[dict], pad_id: int) -> dict:
    """2n right-padded rows (n chosen, then n rejected): input_ids, attention_mask, labels; and index (n,)."""
    rows = [(it["chosen_ids"], it["chosen_labels"]) for it in items] + \
           [(it["rejected_ids"], it["rejected_labels"]) for it in items]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (ids, labs) in enumerate(rows):
        input_ids[k, : len(ids)] = torch.tensor(ids)
        labels[k, : len(labs)] = torch.tensor(labs)
        mask[k, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
