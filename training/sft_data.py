"""Chat data for instruction tuning: read, render, mask, mix and pack.

Records are JSONL in the OpenAI shape, `{"messages": [{"role": ..., "content": ...}, ...]}`, with
optional tool use: a record's `tools` (OpenAI function schemas), assistant messages with
`tool_calls`, and `tool` messages holding a call's result under its `tool_call_id`. Each is
rendered with the tokenizer's own chat template, so training sees exactly the text that serving
builds (tool-call arguments are parsed to objects first, as vLLM does before rendering). Only the
assistant's turns carry loss, their tool calls included, together with the end-of-turn token that
closes them (so the model learns when to stop); system, user and tool turns and the template's
framing carry none.

Examples are packed into fixed-length rows. Inside a row, position ids restart at 0 for every
example, and attention is block-diagonal: a token sees earlier tokens of its own example only.
transformers can infer that block structure from the position ids alone, but only when the model
is called with no cache (`use_cache=False`); with the default cache it silently lets examples see
each other. So `collate` builds the 4-D block-diagonal causal mask itself for the eager and SDPA
backends, which holds however the model is called. (flash-attention takes no 4-D mask; there the
position ids select its variable-length path.)

A record that cannot be used (bad JSON, no messages, unknown role, malformed tools, tool calls or
tool results, no assistant turn, too long for a row) is counted under its reason and reported; it is
never silently dropped and never fatal.
"""

from __future__ import annotations

import bisect
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .documents import block_causal_mask  # noqa: F401  (kept importable from here)

log = logging.getLogger(__name__)
T = TypeVar("T")

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
SHOWN_PER_REASON = 3  # how many file:line examples each malformed reason keeps for the report


class MalformedRecord(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class RecordStats:
    """What happened to every record read: kept, or malformed and why."""

    read: int = 0
    kept: int = 0
    malformed: Counter = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def reject(self, reason: str, location: str, detail: str) -> None:
        self.malformed[reason] += 1
        if len(self.where[reason]) < SHOWN_PER_REASON:
            self.where[reason].append(f"{location} ({detail})")

    def merge(self, other: RecordStats) -> None:
        self.read += other.read
        self.kept += other.kept
        self.malformed.update(other.malformed)
        for reason, places in other.where.items():
            self.where[reason].extend(places[: SHOWN_PER_REASON - len(self.where[reason])])

    def report(self) -> str:
        lines = [f"{self.read} records read, {self.kept} kept, {sum(self.malformed.values())} malformed"]
        for reason, n in self.malformed.most_common():
            lines.append(f"  {reason}: {n}, e.g. " + "; ".join(self.where[reason]))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "malformed": dict(self.malformed),
            "examples": {k: list(v) for k, v in self.where.items()},
        }


# --- rendering ---------------------------------------------------------------------------------------


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
        return ""  # an assistant turn that only calls tools
    # The OpenAI shape also allows a list of parts; text parts are all a language model reads.
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise MalformedRecord("bad_message", f"message {index} has no text content")


def _tool_calls(message: dict, index: int) -> list[dict]:
    """The assistant's tool calls as {"id", "type", "function": {"name", "arguments": object}}."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise MalformedRecord("bad_tool_call", f"message {index}: tool_calls must be a non-empty list")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MalformedRecord(
                "bad_tool_call", f'message {index}, call {k}: expected {{"function": {{"name", "arguments"}}}}'
            )
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            # OpenAI sends arguments as a JSON string; vLLM parses it before rendering, so do we.
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise MalformedRecord("bad_tool_call",
                                      f"message {index}, call {k}: arguments are not JSON ({err.msg})") from None
        if not isinstance(arguments, dict):
            raise MalformedRecord("bad_tool_call", f"message {index}, call {k}: arguments must be a JSON object")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if call.get("id") is not None:
            entry = {"id": str(call["id"]), **entry}
        out.append(entry)
    return out


def record_tools(record: dict) -> list[dict] | None:
    """The record's `tools` (OpenAI function schemas) for the chat template, or None."""
    tools = record.get("tools") if isinstance(record, dict) else None
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise MalformedRecord("bad_tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MalformedRecord("bad_tools", f"tool {k} has no function name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise MalformedRecord("bad_tools", f"tool {k} ({fn['name']}): parameters must be a JSON schema object")
    return tools or None


def check_messages(record, roles: Sequence[str] = ROLES) -> list[dict]:
    """The record's messages as {"role", "content"} with text content (plus `tool_calls` on assistant
    turns that call tools, `tool_call_id` on tool results), or MalformedRecord."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise MalformedRecord("no_messages", 'expected {"messages": [{"role": ..., "content": ...}, ...]}')
    messages = []
    call_ids: set[str] | None = None  # ids of the last assistant turn's calls; None before any call
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise MalformedRecord("bad_message", f"message {i} is not an object with a role")
        if m["role"] not in roles:
            raise MalformedRecord("unknown_role", f"message {i} has role {m['role']!r}; known: {', '.join(roles)}")
        message = {"role": m["role"], "content": _content(m, i)}
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m, i)
            call_ids = {c["id"] for c in message["tool_calls"] if "id" in c}
        elif m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if call_ids is None:
                raise MalformedRecord("bad_tool_message", f"message {i} is a tool result with no tool call before it")
            if not isinstance(call_id, str) or not call_id:
                raise MalformedRecord("bad_tool_message", f"message {i} is a tool result without a tool_call_id")
            if call_ids and call_id not in call_ids:
                raise MalformedRecord(
                    "bad_tool_message", f"message {i} answers {call_id!r}, which no earlier tool call has as its id"
                )
            message["tool_call_id"] = call_id
            if isinstance(m.get("name"), str):
                message["name"] = m["name"]
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRecord("no_assistant_turn", "nothing for the model to learn")
    while messages[-1]["role"] != "assistant":
        messages.pop()  # trailing turns with no answer after them carry no loss and teach nothing
    return messages


def render_example(
    tokenizer, messages: list[dict], max_len: int | None = None, source: str = "", tools: list[dict] | None = None,
    label_from: int = 0,
) -> Example:
    """Token ids of the conversation as the chat template renders it (with `tools` in its system
    turn), and labels that keep only the assistant turns (content, tool calls, end-of-turn token)
    from message `label_from` on (a preference pair's answer after its prompt)."""

    def render(part: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(part, tools=tools, tokenize=False, add_generation_prompt=prompt)

    # The template is rendered for each prefix of the conversation; each message's text is what
    # the next prefix adds, which locates the assistant's turns in the final text.
    texts = [""]
    for i in range(1, len(messages) + 1):
        text = render(messages[:i])
        if not text.startswith(texts[-1]):
            raise ValueError(
                "the tokenizer's chat template renders earlier turns differently once later ones follow, "
                "so assistant turns cannot be located; use a template that appends turns"
            )
        texts.append(text)
    full = texts[-1]
    for tool in tools or []:
        if tool["function"]["name"] not in full:
            raise ValueError(
                "the tokenizer's chat template does not render `tools`; install pangu-pi's with "
                "`pangu-pi tokenizer template DIR` (DIR: the tokenizer or checkpoint folder)"
            )
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < label_from:
            continue
        start, end = texts[i], texts[i + 1]
        # The turn's own text starts where the generation prompt (the assistant's header) ends.
        head = render(messages[:i], prompt=True) if i else ""
        if i and end.startswith(head) and len(head) >= len(start):
            begin = len(head)
        else:
            at = end.find(m["content"], len(start)) if m["content"] else -1
            begin = at if at >= 0 else len(start)
        for call in m.get("tool_calls", []):
            if call["function"]["name"] not in end[begin:]:
                raise ValueError(
                    "the tokenizer's chat template does not render assistant `tool_calls`; install pangu-pi's "
                    "with `pangu-pi tokenizer template DIR` (DIR: the tokenizer or checkpoint folder)"
                )
        # The span runs to the end of the turn, trailing whitespace aside: past the content that is the
        # template's end-of-turn marker, which the model must learn to emit.
        spans.append((begin, len(end.rstrip())))

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (a, b) in enumerate(offsets):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[k] = ids[k]
    if labels and labels[0] != IGNORE_INDEX:
        labels[0] = IGNORE_INDEX  # the first token has nothing before it in its example to predict it from
    if max_len is not None and len(ids) > max_len:
        raise MalformedRecord("too_long", f"{len(ids)} tokens, rows hold {max_len}")
    if all(x == IGNORE_INDEX for x in labels):
        raise MalformedRecord("no_assistant_turn", "the assistant turns render to no tokens")
    return Example(ids, labels, source)


def read_records(path, render: Callable[[dict], T], stats: RecordStats) -> list[T]:
    """`render` applied to each record of a JSONL file. A line that is not JSON, or a record `render`
    refuses with MalformedRecord, is counted in `stats` under its reason and place, and skipped."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            stats.read += 1
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                stats.reject("bad_json", where, err.msg)
                continue
            try:
                out.append(render(record))
                stats.kept += 1
            except MalformedRecord as err:
                stats.reject(err.reason, where, err.detail)
    return out


def read_chat_jsonl(
    path, tokenizer, max_len: int, stats: RecordStats | None = None, roles: Sequence[str] = ROLES
) -> tuple[list[Example], RecordStats]:
    stats = stats if stats is not None else RecordStats()

    def render(record: dict) -> Example:
        messages, tools = check_messages(record, roles), record_tools(record)
        return render_example(tokenizer, messages, max_len, str(path), tools)

    return read_records(path, render, stats), stats


# --- mixing ------------------------------------------------------------------------------------------


def mix(datasets: Sequence[Sequence[Example]], weights: Sequence[float], total: int | None = None, seed: int = 0):
    """Draw `total` examples (default: as many as there are) with dataset i supplying a share
    weight_i / Σ weights. A dataset smaller than its share is repeated whole before any example
    repeats a third time; a larger one is subsampled. Returns the shuffled mixture and, per dataset,
    how many it had and how many were drawn."""
    if len(datasets) != len(weights):
        raise ValueError("one weight per dataset")
    if any(not (w > 0) for w in weights):
        raise ValueError(f"dataset weights must be positive, got {list(weights)}")
    total = sum(map(len, datasets)) if total is None else total
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    # Largest remainders get the leftover examples, so the counts add up to `total` exactly.
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed)
    mixture, drawn = [], []
    for data, n in zip(datasets, counts):
        if n and not data:
            raise ValueError("a dataset with a positive weight has no usable examples")
        picked: list[Example] = []
        while len(picked) < n:
            order = list(range(len(data)))
            rng.shuffle(order)
            picked += [data[i] for i in order[: n - len(picked)]]
        mixture += picked
        drawn.append({"available": len(data), "drawn": n, "epochs": n / len(data) if data else 0.0})
    rng.shuffle(mixture)
    return mixture, drawn


# --- packing -----------------------------------------------------------------------------------------


def pack(examples: Iterable[Example], seq_len: int) -> list[list[Example]]:
    """Group examples into rows of at most `seq_len` tokens, best fit: each example goes to the row
    whose free space it fills most tightly, which keeps padding low without reordering much."""
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for ex in examples:
        if len(ex) > seq_len:
            raise ValueError(f"an example of {len(ex)} tokens cannot fit a row of {seq_len}")
        k = bisect.bisect_left(free, (len(ex), -1))
        if k == len(free):
            rows.append([ex])
            bisect.insort(free, (seq_len - len(ex), len(rows) - 1))
        else:
            space, row = free.pop(k)
            rows[row].append(ex)
            bisect.insort(free, (space - len(ex), row))
    return rows


def materialise(row: Sequence[Example], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, labels, positions = [], [], []
    for ex in row:
        ids += ex.input_ids
        labels += ex.labels
        positions += range(len(ex))
    pad = seq_len - len(ids)
    # Padding forms an example of its own (positions from 0): it attends to nothing real and has no loss.
    ids += [pad_id] * pad
    labels += [IGNORE_INDEX] * pad
    positions += range(pad)
    return np.array(ids, np.int64), np.array(labels, np.int64), np.array(positions, np.int64)


def collate(batch: Sequence[dict], attn_implementation: str = "sdpa") -> dict:
    """Stack rows into a batch for `model(**batch)`: input_ids, labels, position_ids and, except for
    flash-attention, the block-diagonal causal attention_mask."""
    out = {k: torch.stack([b[k] for b in batch]) for k in ("input_ids", "labels", "position_ids")}
    if "flash" not in attn_implementation:
        out["attention_mask"] = block_causal_mask(out["position_ids"])
    return out


@dataclass
class DatasetSpec:
    path: str
    weight: float = 1.0


class PackedSFTDataset(torch.utils.data.Dataset):
    """Packed rows of chat examples from several JSONL datasets mixed by weight.

    Each item is a dict of LongTensors of length `seq_len`: input_ids, labels, position_ids. Batch
    them with `collate`. `stats` tells what was read, rejected, drawn and packed.
    """

    def __init__(
        self,
        sources: Sequence[DatasetSpec | dict | str | tuple],
        tokenizer,
        seq_len: int,
        total: int | None = None,
        seed: int = 0,
        roles: Sequence[str] = ROLES,
    ):
        from pangu_pi.corpus import expand_inputs

        if isinstance(sources, str | Path | dict | DatasetSpec):
            sources = [sources]
        specs = [_spec(s) for s in sources]
        if not specs:
            raise ValueError("no datasets given; list at least one JSONL file of chat records")
        if seq_len < 8:
            raise ValueError(f"seq_len {seq_len} is too short for a chat example")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.seq_len = seq_len
        self.records = RecordStats()
        per_source, datasets = {}, []
        for spec in specs:
            examples, stats = [], RecordStats()
            for path in expand_inputs([spec.path]):
                examples += read_chat_jsonl(path, tokenizer, seq_len, stats, roles)[0]
            if not examples:
                raise ValueError(f"{spec.path}: no usable chat records ({stats.report()})")
            per_source[spec.path] = stats.to_dict()
            self.records.merge(stats)
            datasets.append(examples)
        if self.records.malformed:
            log.warning("malformed chat records skipped: %s", self.records.report())
        mixture, drawn = mix(datasets, [s.weight for s in specs], total, seed)
        rows = pack(mixture, seq_len)
        arrays = [materialise(r, seq_len, pad_id) for r in rows]
        self.input_ids = np.stack([a[0] for a in arrays])
        self.labels = np.stack([a[1] for a in arrays])
        self.position_ids = np.stack([a[2] for a in arrays])
        tokens = sum(len(e) for e in mixture)
        self.stats = {
            "records": self.records.to_dict(),
            "per_source": per_source,
            "mixture": {s.path: {"weight": s.weight, **d} for s, d in zip(specs, drawn)},
            "examples": len(mixture),
            "rows": len(rows),
            "fill": tokens / max(1, len(rows) * seq_len),
            "loss_tokens": int((self.labels != IGNORE_INDEX).sum()),
        }

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": torch.from_numpy(self.input_ids[i]),
            "labels": torch.from_numpy(self.labels[i]),
            "position_ids": torch.from_numpy(self.position_ids[i]),
        }

    def summary(self) -> str:
        s = self.stats
        return (
            f"{self.records.report()}\n{s['examples']} examples packed into {s['rows']} rows of {self.seq_len} tokens "
            f"({100 * s['fill']:.1f}% filled, {s['loss_tokens']} tokens with loss)"
        )


def _spec(source) -> DatasetSpec:
    if isinstance(source, DatasetSpec):
        return source
    if isinstance(source, str | Path):
        return DatasetSpec(str(source))
    if isinstance(source, dict):
        unknown = set(source) - {"path", "weight"}
        if "path" not in source or unknown:
            raise ValueError(f"a dataset entry needs 'path' (and optionally 'weight'), got {source}")
        return DatasetSpec(str(source["path"]), float(source.get("weight", 1.0)))
    path, weight = source
    return DatasetSpec(str(path), float(weight))
