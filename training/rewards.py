"""Reward functions for GRPO (`finetune.grpo.rewards`): built-in checkers, user functions, a weighted sum.

A reward function scores a batch of completions; its signature is TRL's, so a function written for
TRL's GRPOTrainer runs here unchanged:

    def my_reward(prompts, completions, completion_ids, **fields) -> list[float | None]

    prompts         one per completion: the prompt's messages [{"role", "content"}, ...]
    completions     one per completion: [{"role": "assistant", "content": TEXT}] (the sampled answer,
                    special tokens removed)
    completion_ids  one per completion: the sampled token ids (the end-of-turn token included)
    **fields        every other field of the prompt records, one value per completion (`answer`,
                    `tools`, ...; a field named like an argument here is not passed), and `stopped`
                    (whether the completion ended with an end-of-turn token rather than at
                    finetune.grpo.max_completion_length)

Return one number per completion, or None where the function does not apply (a format check on a
record that has no schema). Configure them as a list; each entry names a built-in or `module:function`,
a weight, and keyword options passed to the function (built-ins list theirs below):

    finetune:
      grpo:
        rewards:
          - {function: numeric_answer, weight: 1.0, rel_tol: 0.001}
          - {function: length_penalty, weight: 0.1, max_tokens: 64}
          - {function: my_rewards:json_has_citation, weight: 0.5}

The reward of a completion is Σ weight × reward over the functions that apply to it.

Errors. A function that raises (or returns something other than one number or None per completion)
is called again one completion at a time, so that only the completions it fails on lose their score;
each failure is reported on the process's stderr with the prompt's index in the dataset, the
function's name and the error, and counted (`reward_errors` in the step metrics and the run's
summary). Such a completion's reward is NaN, never 0: it is left out of its group's mean and
standard deviation and its advantage is 0, so it neither earns nor costs anything, and the rest of
its group is scored on the others alone. (A completion to which no function applies, every one
returning None, is left out in the same way, but is not an error.)

Built-ins (`function:` names):

    numeric_answer   1 if the last number in the completion equals the record's `answer` within
                     `rel_tol` (relative, default 1e-6) or `abs_tol` (default 1e-9), else 0. Thousands
                     separators and a trailing % are read; `field` names another record field.
    option_letter    1 if the option letter the completion picks (`B`, `(B)`, `B.`, `Answer: B`, ...:
                     the last standalone capital among `letters`, default ABCDEFGH) is the record's
                     `answer`, else 0.
    json_schema      1 if the completion (or its fenced ```json block, or its first {...}) is JSON valid
                     under the record's `schema` field (or the `schema` option), else 0.
    tool_call        1 if the completion calls (<tool_call>{"name", "arguments"}</tool_call>, the chat
                     template's format) the function the record's `tool` field names, with arguments
                     valid under that tool's `parameters` schema in the record's `tools`; 0.5 if the
                     name is right but the arguments are not; 0 otherwise.
    length_penalty   0 up to `max_tokens` completion tokens, then −(excess / max_tokens) down to −1;
                     −1 for a completion cut off at max_completion_length (`stopped` false).
    regex_format     1 if the completion matches the regular expression `pattern` (re.fullmatch, DOTALL), else 0.
    closer_to_chosen 1 if the completion is nearer the record's `chosen` answer than its `rejected` one,
                     0 if nearer the rejected, 0.5 if as near: by their last numbers where the two answers
                     end in different numbers, else by character similarity (difflib's ratio). Either
                     field may be text or DPO's [{"role": "assistant", "content": ...}]; so a preference
                     file's pairs serve as GRPO prompts, and a policy that cannot yet write the exact
                     answer still learns which of two plausible answers its own are closer to.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from pangu_pi.errors import UserError

# ------------------------------------------------------------------------------------------------
# Built-in checkers


def _texts(completions) -> list[str]:
    """Completion texts from TRL's conversational form ([{"role": "assistant", "content": ...}]) or strings."""
    out = []
    for c in completions:
        if isinstance(c, str):
            out.append(c)
        else:
            out.append("".join(str(m.get("content") or "") for m in c if isinstance(m, dict)))
    return out


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?%?")


def last_number(text: str) -> float | None:
    """The last number written in `text` (1,234.5 and 12% read as 1234.5 and 12), or None."""
    found = None
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if not any(ch.isdigit() for ch in s):
            continue
        s = s.replace(",", "").rstrip("%")
        try:
            found = float(s)
        except ValueError:
            continue
    return found


def numeric_answer(prompts, completions, answer=None, field_values=None, *, rel_tol: float = 1e-6,
                   abs_tol: float = 1e-9, **_):
    wanted = field_values if field_values is not None else answer
    if wanted is None:
        return [None] * len(completions)
    out = []
    for text, want in zip(_texts(completions), wanted):
        if want is None:
            out.append(None)
            continue
        want = float(str(want).replace(",", "").rstrip("%")) if isinstance(want, str) else float(want)
        got = last_number(text)
        out.append(1.0 if got is not None and math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0)
    return out


def picked_option(text: str, letters: str = "ABCDEFGH") -> str | None:
    """The option a completion picks: the last capital among `letters` standing alone as a word."""
    found = re.findall(rf"(?<![A-Za-z])([{re.escape(letters)}])(?![A-Za-z])", text)
    return found[-1] if found else None


def option_letter(prompts, completions, answer=None, field_values=None, *, letters: str = "ABCDEFGH", **_):
    wanted = field_values if field_values is not None else answer
    if wanted is None:
        return [None] * len(completions)
    return [None if want is None else float(picked_option(text, letters) == str(want).strip().strip("()."))
            for text, want in zip(_texts(completions), wanted)]


def extract_json(text: str):
    """The JSON value a completion holds: all of it, its fenced ```json block, or its first {...}
    (ValueError if none)."""
    candidates = [text.strip()]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        candidates.append(fenced.group(1).strip())
    start = text.find("{")
    if start >= 0:
        candidates.append(text[start:])
    for c in candidates:
        try:
            return json.JSONDecoder().raw_decode(c)[0]
        except (json.JSONDecodeError, ValueError):
            continue
    raise ValueError("no JSON value")


def _valid(value, schema) -> bool:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def json_schema(prompts, completions, schema=None, *, field_values=None, **_):
    schemas = field_values if field_values is not None else schema
    if schemas is None:
        return [None] * len(completions)
    if isinstance(schemas, dict):  # one schema from the config for every completion
        schemas = [schemas] * len(completions)
    out = []
    for text, s in zip(_texts(completions), schemas):
        if s is None:
            out.append(None)
            continue
        try:
            out.append(float(_valid(extract_json(text), s)))
        except ValueError:
            out.append(0.0)
    return out


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[dict]:
    """The calls a completion makes, as the chat template writes them (Hermes style, what vLLM's
    `hermes` parser reads): [{"name", "arguments"}, ...]; unparsable calls are left out."""
    calls = []
    for body in _TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            args = call.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            calls.append({"name": call["name"], "arguments": args})
    return calls


def tool_call(prompts, completions, tool=None, tools=None, **_):
    if tool is None:
        return [None] * len(completions)
    out = []
    for text, want, schemas in zip(_texts(completions), tool, tools or [None] * len(completions)):
        if want is None:
            out.append(None)
            continue
        named = [c for c in parse_tool_calls(text) if c["name"] == want]
        if not named:
            out.append(0.0)
            continue
        params = next(((t.get("function") or t).get("parameters") for t in schemas or []
                       if (t.get("function") or t).get("name") == want), None) or {"type": "object"}
        ok = any(isinstance(c["arguments"], dict) and _valid(c["arguments"], params) for c in named)
        out.append(1.0 if ok else 0.5)
    return out


def length_penalty(prompts, completions, completion_ids=None, stopped=None, *, max_tokens: int = 256, **_):
    out = []
    for k, ids in enumerate(completion_ids):
        if stopped is not None and not stopped[k]:
            out.append(-1.0)
            continue
        excess = max(0, len(ids) - max_tokens)
        out.append(-min(1.0, excess / max_tokens))
    return out


def regex_format(prompts, completions, *, pattern: str, **_):
    rx = re.compile(pattern, re.DOTALL)
    return [1.0 if rx.fullmatch(text) else 0.0 for text in _texts(completions)]


def _answer_text(value) -> str:
    """A chosen/rejected field as text: a string, or the content of DPO's assistant messages."""
    if isinstance(value, list):
        return "".join(m.get("content") or "" for m in value if isinstance(m, dict))
    return str(value)


def closer_to_chosen(prompts, completions, chosen=None, rejected=None, **_):
    from difflib import SequenceMatcher

    if chosen is None or rejected is None:
        return [None] * len(completions)
    out = []
    for text, good, bad in zip(_texts(completions), chosen, rejected):
        if good is None or bad is None:
            out.append(None)
            continue
        good, bad = _answer_text(good), _answer_text(bad)
        want, wrong = last_number(good), last_number(bad)
        if want is not None and wrong is not None and want != wrong:
            got = last_number(text)
            if got is None:  # the two answers differ by their number, and this one gives none
                out.append(0.0)
                continue
            to_good, to_bad = abs(got - want), abs(got - wrong)
        else:
            to_good = 1 - SequenceMatcher(None, text, good, autojunk=False).ratio()
            to_bad = 1 - SequenceMatcher(None, text, bad, autojunk=False).ratio()
        out.append(1.0 if to_good < to_bad else 0.0 if to_good > to_bad else 0.5)
    return out


BUILTINS: dict[str, Callable] = {
    "numeric_answer": numeric_answer,
    "option_letter": option_letter,
    "json_schema": json_schema,
    "tool_call": tool_call,
    "length_penalty": length_penalty,
    "regex_format": regex_format,
    "closer_to_chosen": closer_to_chosen,
}
# The options each built-in takes from its config entry (anything else there is refused).
BUILTIN_OPTIONS = {
    "numeric_answer": {"rel_tol", "abs_tol", "field"},
    "option_letter": {"letters", "field"},
    "json_schema": {"schema", "field"},
    "tool_call": set(),
    "length_penalty": {"max_tokens"},
    "regex_format": {"pattern"},
    "closer_to_chosen": set(),
}
ENTRY_KEYS = {"function", "weight", "name"}


# ------------------------------------------------------------------------------------------------
# Resolving the config's list


@dataclass
class RewardFunction:
    name: str  # the metric's name: reward_NAME
    function: Callable
    weight: float
    options: dict = field(default_factory=dict)


def import_function(spec: str, where: str) -> Callable:
    """`module:function` (or `module.function`) imported, or UserError naming the entry and the fix."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"{where}: {spec!r} is neither a built-in reward ({', '.join(BUILTINS)}) nor module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is the same user problem
        raise UserError(f"{where}: cannot import module {module_name!r} for reward {spec!r} ({type(err).__name__}: "
                        f"{err}); put it on PYTHONPATH or fix it") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{where}: module {module_name!r} has no function {attr!r} (reward {spec!r})")
    return fn


def resolve_rewards(entries: list) -> list[RewardFunction]:
    """The config's `finetune.grpo.rewards` as callables with weights; refuses (UserError, one line) an
    entry that is malformed, names no built-in and imports nothing, or gives a built-in unknown options."""
    if not entries:
        raise UserError("finetune.grpo.rewards is empty; list at least one, e.g. "
                        "[{function: numeric_answer, weight: 1.0}] (docs/training.md, GRPO)")
    out, names = [], set()
    for i, entry in enumerate(entries):
        where = f"finetune.grpo.rewards[{i}]"
        if isinstance(entry, str):
            entry = {"function": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("function"), str):
            raise UserError(f"{where} must be {{function: NAME or module:function, weight: NUMBER}}, got {entry!r}")
        spec = entry["function"]
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"{where}.weight must be a number, got {weight!r}")
        options = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        if spec in BUILTINS:
            unknown = set(options) - BUILTIN_OPTIONS[spec]
            if unknown:
                allowed = ", ".join(sorted(BUILTIN_OPTIONS[spec])) or "none"
                raise UserError(f"{where}: {spec} takes no option {sorted(unknown)[0]!r} (options: {allowed})")
            if spec == "regex_format" and "pattern" not in options:
                raise UserError(f"{where}: regex_format needs `pattern`, a regular expression")
            fn = BUILTINS[spec]
            default = spec
        else:
            fn = import_function(spec, where)
            if not signature_ok(fn):
                raise UserError(f"{where}: {spec} must accept **kwargs (it is called as fn(prompts=..., "
                                "completions=..., completion_ids=..., **record_fields)); add **kwargs to it")
            default = spec.replace(":", ".").rsplit(".", 1)[-1]
        name = re.sub(r"\W", "_", str(entry.get("name") or default))
        if name in names:
            raise UserError(f"{where}: a second reward named {name!r}; give one a distinct `name`")
        names.add(name)
        out.append(RewardFunction(name, fn, float(weight), options))
    return out


# ------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class RewardError:
    prompt_index: int
    completion: int  # its place in the scored batch
    reward: str
    error: str


def _call(reward: RewardFunction, prompts, completions, completion_ids, fields: dict) -> list:
    kwargs = dict(fields)
    options = dict(reward.options)
    column = options.pop("field", None)
    if column is not None:  # a built-in reading another record field than its default
        kwargs["field_values"] = fields.get(column, [None] * len(completions))
    kwargs.update(options)
    values = reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    values = list(values)
    if len(values) != len(completions):
        raise ValueError(f"returned {len(values)} rewards for {len(completions)} completions")
    out = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise TypeError(f"returned {type(v).__name__} {v!r}, not a number or None")
        else:
            out.append(float(v))
    return out


def score(rewards: list[RewardFunction], prompts: list, completions: list, completion_ids: list,
          fields: dict, prompt_index: list[int]) -> tuple[list[list[float]], list[float], list[RewardError]]:
    """(per function: one value per completion — NaN where it does not apply or failed —, the weighted
    total per completion — NaN where any function failed or none applies —, the failures)."""
    nan = float("nan")
    n = len(completions)
    per_function, failed, errors = [], [False] * n, []
    for reward in rewards:
        try:
            values = _call(reward, prompts, completions, completion_ids, fields)
        except Exception:
            # One at a time, to find the completions it fails on and keep the others' scores.
            values = []
            for k in range(n):
                try:
                    values += _call(reward, prompts[k:k + 1], completions[k:k + 1], completion_ids[k:k + 1],
                                    {key: v[k:k + 1] for key, v in fields.items()})
                except Exception as err:  # any failure of a reward is reported and counted, not fatal
                    values.append(nan)
                    failed[k] = True
                    errors.append(RewardError(prompt_index[k], k, reward.name, f"{type(err).__name__}: {err}"))
        per_function.append([nan if v is None else v for v in values])
    totals = []
    for k in range(n):
        applied = [(r.weight, col[k]) for r, col in zip(rewards, per_function) if not math.isnan(col[k])]
        totals.append(nan if failed[k] or not applied else sum(w * v for w, v in applied))
    return per_function, totals, errors


def report_errors(errors: list[RewardError], rank: int) -> None:
    for e in errors:
        print(f"pangu-pi: reward {e.reward!r} failed on prompt {e.prompt_index} (rank {rank}): {e.error}; "
              "this completion is left out of its group", file=sys.stderr, flush=True)


def describe(rewards: list[RewardFunction]) -> str:
    parts = []
    for r in rewards:
        opts = ", ".join(f"{k}={v!r}" for k, v in r.options.items())
        parts.append(f"{r.weight:g} × {r.name}" + (f" ({opts})" if opts else ""))
    return " + ".join(parts)


def signature_ok(fn: Callable) -> bool:
    """Whether `fn` can be called with TRL's keyword arguments (prompts, completions, completion_ids, **fields)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


