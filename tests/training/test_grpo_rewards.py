"""GRPO's rewards (training/rewards.py): the built-in checkers, user functions by `module:function`,
the weighted sum, and a reward that raises: reported with the prompt's index, counted, its completion
left out of the group (NaN), never scored 0."""

from __future__ import annotations

import math

import pytest

from pangu_pi.errors import UserError


def _c(*texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_numeric_answer_reads_the_last_number_within_tolerance():
    from pangu_pi.training.rewards import numeric_answer

    texts = ["The rate is 5.25%.", "It is 1,234.5 yuan", "about 12", "no number", "2 then 7"]
    got = numeric_answer(None, _c(*texts), answer=[5.25, "1234.5", 12.001, 3, 2], rel_tol=1e-3)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert numeric_answer(None, _c("x"), answer=None) == [None]


def test_option_letter_takes_the_option_the_completion_picks():
    from pangu_pi.training.rewards import option_letter

    texts = ["The answer is (B).", "B", "Answer: C. Because A is wrong", "I think it is D", "Because"]
    assert option_letter(None, _c(*texts), answer=["B", "B", "A", "D", "B"]) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_closer_to_chosen_compares_numbers_where_the_answers_differ_by_one_else_the_text():
    from pangu_pi.training.rewards import closer_to_chosen

    right = [{"role": "assistant", "content": "Simple interest = $600 × 6% × 6 = $216."}]
    wrong = [{"role": "assistant", "content": "Simple interest = $600 × 6% × 7 = $252."}]
    texts = ["... = $220.", "... = $250.", "... = $234.", "I cannot say.", "= $216"]
    assert closer_to_chosen(None, _c(*texts), chosen=[right] * 5, rejected=[wrong] * 5) == [1.0, 0.0, 0.5, 0.0, 1.0]
    void, valid = "The contract is void: a party is under 18.", "The contract is valid: both parties agreed."
    texts = ["The contract is void: one party is 17.", "The contract is valid.", "", "x"]
    got = closer_to_chosen(None, _c(*texts), chosen=[void] * 4, rejected=[valid] * 4)
    assert got[:2] == [1.0, 0.0]
    assert closer_to_chosen(None, _c("a"), chosen=None, rejected=None) == [None]
    assert closer_to_chosen(None, _c("a"), chosen=[None], rejected=["b"]) == [None]


def test_json_schema_validates_the_completion_or_its_json_block():
    from pangu_pi.training.rewards import json_schema

    schema = {"type": "object", "properties": {"rate": {"type": "number"}}, "required": ["rate"]}
    texts = ['{"rate": 0.05}', 'Here:\n```json\n{"rate": 1}\n```', '{"rate": "high"}', "not json", '{"rate": 2} tail']
    assert json_schema(None, _c(*texts), schema=[schema] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_tool_call_reads_the_chat_templates_format_and_checks_the_arguments(tokenizer_dir):
    """A completion rendered by the project's chat template from an assistant turn with tool_calls is
    parsed back; the right function with schema-valid arguments scores 1, bad arguments 0.5, else 0."""
    from pangu_pi.tokenizer import load_tokenizer
    from pangu_pi.training.rewards import parse_tool_calls, tool_call

    tokenizer = load_tokenizer(tokenizer_dir)
    tools = [{"type": "function", "function": {"name": "get_rate", "parameters": {
        "type": "object", "properties": {"currency": {"type": "string"}}, "required": ["currency"]}}}]

    def rendered(name, arguments):
        turn = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}}]}
        head = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tools=tools, tokenize=False,
                                             add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, turn], tools=tools, tokenize=False)
        return full[len(head):].replace("<|im_end|>", "").strip()

    good, bad_args, other = rendered("get_rate", {"currency": "EUR"}), rendered("get_rate", {"currency": 3}), \
        rendered("get_time", {})
    assert parse_tool_calls(good) == [{"name": "get_rate", "arguments": {"currency": "EUR"}}]
    got = tool_call(None, _c(good, bad_args, other, "no call"), tool=["get_rate"] * 4, tools=[tools] * 4)
    assert got == [1.0, 0.5, 0.0, 0.0]


def test_length_penalty_and_regex_format():
    from pangu_pi.training.rewards import length_penalty, regex_format

    got = length_penalty(None, _c("a", "b", "c"), completion_ids=[[1] * 4, [1] * 12, [1] * 3],
                         stopped=[True, True, False], max_tokens=8)
    assert got == [0.0, -0.5, -1.0]
    assert regex_format(None, _c("<a>1</a>", "1"), pattern=r"<a>\d+</a>") == [1.0, 0.0]


def test_user_rewards_import_by_module_function_and_combine_by_weight(tmp_path, monkeypatch):
    from pangu_pi.training.rewards import resolve_rewards, score

    (tmp_path / "my_rewards.py").write_text(
        "def longer(prompts, completions, **kw):\n"
        "    return [len(c[0]['content']) / 10 for c in completions]\n"
        "def picky(prompts, completions, answer, **kw):\n"
        "    out = []\n"
        "    for c, a in zip(completions, answer):\n"
        "        if a == 13:\n"
        "            raise RuntimeError('thirteen')\n"
        "        out.append(None if a is None else 1.0)\n"
        "    return out\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = resolve_rewards([{"function": "numeric_answer", "weight": 2.0},
                               {"function": "my_rewards:longer", "weight": 0.5},
                               {"function": "my_rewards:picky", "weight": 1.0, "name": "pick"}])
    assert [r.name for r in rewards] == ["numeric_answer", "longer", "pick"]
    completions = _c("is 4", "is 13", "is 5", "nothing")
    per_fn, totals, errors = score(rewards, [[]] * 4, completions, [[1]] * 4,
                                   {"answer": [4, 13, 4, None]}, prompt_index=[10, 11, 12, 13])
    assert per_fn[0][:3] == [1.0, 1.0, 0.0] and math.isnan(per_fn[0][3])
    assert totals[0] == pytest.approx(2.0 + 0.5 * 0.4 + 1.0)
    assert totals[2] == pytest.approx(0.0 + 0.5 * 0.4 + 1.0)
    # The raising reward fails on prompt 11 only: that completion is NaN (left out), the others keep
    # every score; numeric_answer and picky do not apply to the last (no answer), `longer` does.
    assert math.isnan(totals[1]) and math.isnan(per_fn[2][1])
    assert totals[3] == pytest.approx(0.5 * 0.7)
    assert [(e.prompt_index, e.reward) for e in errors] == [(11, "pick")] and "thirteen" in errors[0].error


@pytest.mark.parametrize("entry,message", [
    ({"function": "no_such_module_xyz:fn"}, "cannot import module 'no_such_module_xyz'"),
    ({"function": "math:no_such_fn"}, "has no function 'no_such_fn'"),
    ({"function": "numeric_answer", "tolerance": 1}, "takes no option 'tolerance'"),
    ({"function": "regex_format"}, "needs `pattern`"),
    ({"function": "numeric_answer", "weight": "heavy"}, "weight must be a number"),
    ({"function": "math:sqrt"}, "must accept **kwargs"),
])
def test_bad_reward_entries_are_refused_with_one_line(entry, message):
    from pangu_pi.training.rewards import resolve_rewards

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("*", r"\*")) as err:
        resolve_rewards([entry])
    assert "\n" not in str(err.value)
