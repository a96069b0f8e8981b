"""Passkey retrieval: a number planted at some depth of a long text, asked for at the end.

The test of whether a model reads its whole context: filler text of a chosen length in tokens, with
one sentence stating a five-digit key placed at a depth between its start (0) and its end (1), then
a question whose answer is that key. The model answers greedily; a trial counts when the first number
it writes is the key. Trials spread their depths evenly over [0, 1] (so a model that only sees the
recent part of its context scores about the fraction it sees), with keys and filler offsets drawn
from a seeded generator, so two models are asked the same questions.

    pangu-pi eval MODEL --passkey 512 1024 2048 [--passkey-trials 40] [--passkey-filler FILE]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pangu_pi.errors import UserError

KEY_SENTENCE = " The pass key is {key}. Remember it: the pass key is {key}. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8  # generated after the prompt; a trial of `length` tokens leaves room for them

# Filler for a model-agnostic default: plain sentences that repeat, saying nothing about any number.
DEFAULT_FILLER = (
    "The ledger was balanced at the end of the quarter. The clerk filed the papers in the archive. "
    "The court rose for the afternoon. The market opened on time and closed quietly. "
)


@dataclass
class Trial:
    length: int
    depth: float
    key: int
    ids: list[int]


def build_trials(tokenizer, length: int, trials: int, filler: str = DEFAULT_FILLER, seed: int = 0,
                 bos: bool = False) -> list[Trial]:
    """`trials` prompts of `length - ANSWER_TOKENS` tokens each (key sentence and question included),
    so that the prompt and the answer together fill `length` tokens of context."""
    rng = random.Random(f"passkey:{seed}:{length}")
    filler_ids = tokenizer.encode(filler, add_special_tokens=False)
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    prefix = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    out = []
    for i in range(trials):
        key = rng.randint(10_000, 99_999)
        depth = (i + 0.5) / trials
        key_ids = tokenizer.encode(KEY_SENTENCE.format(key=key), add_special_tokens=False)
        budget = length - ANSWER_TOKENS - len(prefix) - len(key_ids) - len(question)
        if budget < 1:
            raise UserError(f"--passkey {length} is too short to hold the key sentence and the question "
                             f"({length - budget + 1} tokens at least, the answer's included); ask for a longer length")
        # Enough copies of the filler to cut `budget` tokens from a random offset.
        reps = -(-(budget + len(filler_ids)) // max(1, len(filler_ids)))
        stream = filler_ids * reps
        start = rng.randrange(len(filler_ids))
        text = stream[start:start + budget]
        cut = round(depth * budget)
        ids = prefix + text[:cut] + key_ids + text[cut:] + question
        out.append(Trial(length, depth, key, ids))
    return out


def first_number(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def score(trials: list[Trial], answer, tokenizer, progress: bool = False) -> dict:
    """Accuracy of `answer(ids) -> generated ids` over the trials, overall and by depth (fifths)."""
    from tqdm.auto import tqdm

    right, by_depth = 0, [[0, 0] for _ in range(5)]
    for t in tqdm(trials, desc=f"passkey {trials[0].length}" if trials else "passkey", disable=not progress):
        got = first_number(tokenizer.decode(answer(t.ids), skip_special_tokens=True))
        ok = got == t.key
        right += ok
        bucket = by_depth[min(4, int(t.depth * 5))]
        bucket[0] += ok
        bucket[1] += 1
    return {"n": len(trials), "acc": right / max(1, len(trials)),
            "acc_by_depth": [round(r / n, 4) if n else None for r, n in by_depth]}


def greedy_answerer(model, device, max_new_tokens: int = ANSWER_TOKENS):
    """answer(ids) for a local HF model: greedy decoding of a few tokens after the prompt."""
    import torch

    def answer(ids: list[int]) -> list[int]:
        prompt = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
        return out[0, len(ids):].tolist()

    return answer


def passkey_accuracy(model, tokenizer, lengths: list[int], trials: int, device, filler: str = DEFAULT_FILLER,
                     seed: int = 0, bos: bool = False, progress: bool = True) -> dict:
    """{str(length): {"n", "acc", "acc_by_depth"}} for each length."""
    answer = greedy_answerer(model, device)
    return {str(n): score(build_trials(tokenizer, n, trials, filler, seed, bos), answer, tokenizer, progress)
            for n in lengths}
