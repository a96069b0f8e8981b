"""`pangu-pi eval`: multiple-choice accuracy by option log-likelihood, and perplexity on held-out text.

Multiple choice is scored the way C-Eval, CMMLU, MMLU, FinEval and LawBench's choice tasks usually
are with base models: every option is appended to the question as a continuation, and the option
the model finds likeliest wins. Two readings are reported: `acc` compares summed log-likelihoods,
`acc_norm` divides each by the option's length in bytes (lm-evaluation-harness's `acc_norm`), which
stops long options losing merely for being long.

The same numbers come from a local checkpoint or from an OpenAI-compatible server (vLLM's): there,
each scored sequence is sent as token ids to /v1/completions with `echo=true, logprobs=1,
max_tokens=0`, and the server returns the log-probability of every prompt token.

Task files, by layout:
- CSV with a header naming `question`, option columns `A`, `B`, ... and `answer` (any case; C-Eval,
  CMMLU, FinEval). Extra columns (id, explanation) are ignored.
- CSV without a header (MMLU): question, the options, answer letter.
- JSONL (or a JSON list): {"question", "choices" or "options" (a list, or a dict letter → text),
  "answer" (index or letter)}; other fields (e.g. "family") group the results.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import string
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pangu_pi.folders import is_checkpoint

LETTERS = string.ascii_uppercase
DEFAULT_PROMPT = "Question: {question}\nAnswer:"
GROUP_FIELDS = ("family", "subject", "category")


def _user_error(message: str) -> Exception:
    from pangu_pi.errors import UserError

    return UserError(message)


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int
    group: str | None = None
    where: str = ""


# --- reading tasks -------------------------------------------------------------------------------------


def _answer_index(value, n: int, where: str) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip().upper() in LETTERS[:n] and len(value.strip()) == 1:
        index = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    else:
        raise _user_error(
            f"{where}: answer {value!r} is neither an option letter (A-{LETTERS[n - 1]}) nor an index below {n}"
            + (" (C-Eval's test split carries no answers; evaluate on its val split)" if value in ("", None) else "")
        )
    if not 0 <= index < n:
        raise _user_error(f"{where}: answer index {index} is out of range for {n} options")
    return index


def _read_csv(path: Path) -> list[MCItem]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if not rows:
        raise _user_error(f"{path} holds no rows")
    head = [c.strip().lower() for c in rows[0]]
    items = []
    if "question" in head and "answer" in head and "a" in head and "b" in head:
        q_col, a_col = head.index("question"), head.index("answer")
        option_cols = [head.index(c.lower()) for c in LETTERS if c.lower() in head]
        for lineno, row in enumerate(rows[1:], start=2):
            where = f"{path}:{lineno}"
            if len(row) < len(head):
                raise _user_error(f"{where}: {len(row)} columns, the header has {len(head)}")
            choices = [row[c] for c in option_cols]
            items.append(MCItem(row[q_col], choices, _answer_index(row[a_col], len(choices), where), where=where))
    else:
        for lineno, row in enumerate(rows, start=1):
            where = f"{path}:{lineno}"
            if len(row) < 4:
                raise _user_error(
                    f"{where}: expected question, at least two options and an answer (MMLU layout), got {len(row)} "
                    "columns; or give the file a header row naming question, A, B, ..., answer"
                )
            choices = row[1:-1]
            items.append(MCItem(row[0], choices, _answer_index(row[-1], len(choices), where), where=where))
    return items


def _json_item(record, where: str) -> MCItem:
    if not isinstance(record, dict):
        raise _user_error(f"{where}: expected an object with question, choices and answer")
    question = record.get("question", record.get("query"))
    choices = record.get("choices", record.get("options"))
    if isinstance(choices, dict):
        choices = [choices[k] for k in sorted(choices)]
    if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2 or "answer" not in record:
        raise _user_error(f'{where}: expected {{"question": str, "choices": [at least 2], "answer": index or letter}}')
    group = next((str(record[k]) for k in GROUP_FIELDS if k in record), None)
    choices = [str(c) for c in choices]
    return MCItem(question, choices, _answer_index(record["answer"], len(choices), where), group, where)


def read_task(path) -> list[MCItem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    if path.suffix.lower() == ".csv":
        items = _read_csv(path)
    elif path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise _user_error(f"{path}: a .json task must hold a list of questions")
        items = [_json_item(r, f"{path}[{i}]") for i, r in enumerate(data)]
    else:
        items = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise _user_error(f"{path}:{lineno}: not JSON ({err.msg})") from None
                    items.append(_json_item(record, f"{path}:{lineno}"))
    if not items:
        raise _user_error(f"{path} holds no questions")
    return items


# --- scorers: log-probabilities of token sequences -----------------------------------------------------


class LocalScorer:
    """Log-probabilities from a checkpoint loaded with transformers."""

    def __init__(self, model_dir, device: str = "auto", dtype: str = "float32", batch_size: int = 16):
        import torch
        from transformers import AutoModelForCausalLM

        import pangu_pi  # noqa: F401  (registers the model with the Auto classes)

        if not is_checkpoint(model_dir):
            raise FileNotFoundError(f"no checkpoint in {model_dir} (config.json missing); pass an HF checkpoint folder")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch = torch
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.batch_size = batch_size
        self.name = str(model_dir)

    def token_logprobs(self, seqs: list[list[int]], progress: bool = False) -> list[list[float]]:
        """For each sequence, log p(t_i | t_<i) for i = 1 .. len-1."""
        torch = self.torch
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[list[float]] = [[] for _ in seqs]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
            width = len(seqs[batch[0]])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
                ).logits
            for row, i in enumerate(batch):
                n = len(seqs[i])
                lp = logits[row, : n - 1].float().log_softmax(-1)
                target = ids[row, 1:n].to(lp.device)
                out[i] = lp.gather(-1, target[:, None])[:, 0].tolist()
        return out


class EndpointScorer:
    """Log-probabilities from an OpenAI-compatible completions endpoint that echoes prompt logprobs."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        batch_size: int = 16,
        max_len: int = 4096,
        api_key: str | None = None,
        timeout: float = 600,
    ):
        from pangu_pi.api_client import api_base, connect

        self.base = api_base(url)
        self.client = connect(url, api_key, timeout=timeout)
        self.batch_size = batch_size
        self.max_len = max_len
        self.model = model or self._first_model()
        self.name = f"{self.model} @ {self.base}"
        self.echo_without_generation = True

    def _first_model(self) -> str:
        from pangu_pi.api_client import user_errors

        with user_errors(f"{self.base}/models"):
            models = self.client.models.list().data
        if not models:
            raise _user_error(f"{self.base}/models lists no model; pass --model NAME")
        return models[0].id

    def _completions(self, prompts: list[list[int]], max_tokens: int):
        from pangu_pi.api_client import user_errors

        with user_errors(f"{self.base}/completions"):
            return self.client.completions.create(model=self.model, prompt=prompts, echo=True, logprobs=1,
                                                  temperature=0.0, max_tokens=max_tokens)  # fmt: skip

    def _complete(self, prompts: list[list[int]]) -> list[list[float | None]]:
        if self.echo_without_generation:
            try:
                return self._parse(self._completions(prompts, 0), prompts, 0)
            except Exception as err:  # servers that refuse max_tokens=0: generate one token and drop it
                if "max_tokens" not in str(err):
                    raise
                self.echo_without_generation = False
        return self._parse(self._completions(prompts, 1), prompts, 1)

    @staticmethod
    def _parse(response, prompts: list[list[int]], generated: int) -> list[list[float | None]]:
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(prompts):
            raise _user_error(f"the server answered {len(choices)} choices for {len(prompts)} prompts")
        out = []
        for choice, prompt in zip(choices, prompts):
            lps = choice.logprobs.token_logprobs if choice.logprobs is not None else None
            if lps is None or len(lps) < len(prompt):
                raise _user_error("the server did not echo prompt log-probabilities (it needs echo with logprobs)")
            out.append(lps[: len(prompt)])
        return out

    def token_logprobs(self, seqs: list[list[int]], progress: bool = False) -> list[list[float]]:
        out = []
        for i in tqdm(range(0, len(seqs), self.batch_size), desc="scoring", unit="batch", disable=not progress):
            for lps in self._complete(seqs[i : i + self.batch_size]):
                out.append([float(x) for x in lps[1:]])  # the first token has no context and no score
        return out


# --- multiple choice -------------------------------------------------------------------------------------


@dataclass
class Formatter:
    tokenizer: object
    chat: bool = False
    prompt: str = DEFAULT_PROMPT
    bos: bool = False

    def pair(self, question: str, choice: str) -> tuple[str, str]:
        """(context, continuation) texts."""
        if not self.chat:
            return self.prompt.format(question=question), " " + choice
        user = [{"role": "user", "content": question}]
        context = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": choice}], tokenize=False)
        if not full.startswith(context):
            raise _user_error("the chat template does not render the answer after the generation prompt; drop --chat")
        # Up to and including the end-of-turn token: an option must be the whole answer, not a prefix of it.
        return context, full[len(context) :].rstrip()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sequence(self, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
        ctx = ([self.tokenizer.bos_token_id] if self.bos else []) + self.encode(context)
        cont = self.encode(continuation)
        seq = (ctx + cont)[-max_len:]  # keep the answer; the question loses its start if it must
        return seq, len(cont)


def score_multiple_choice(items: list[MCItem], fmt: Formatter, scorer, progress: bool = True) -> dict:
    seqs, spans = [], []
    for item in items:
        for choice in item.choices:
            context, continuation = fmt.pair(item.question, choice)
            seq, n = fmt.sequence(context, continuation, scorer.max_len)
            seqs.append(seq)
            spans.append((n, len(continuation.encode("utf-8"))))
    logprobs = scorer.token_logprobs(seqs, progress)
    k, correct, correct_norm = 0, 0, 0
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    predictions = []
    for item in items:
        sums, norms = [], []
        for _ in item.choices:
            n_tokens, n_bytes = spans[k]
            s = sum(logprobs[k][-n_tokens:]) if n_tokens else 0.0
            sums.append(s)
            norms.append(s / max(n_bytes, 1))
            k += 1
        pick, pick_norm = max(range(len(sums)), key=sums.__getitem__), max(range(len(norms)), key=norms.__getitem__)
        correct += pick == item.answer
        correct_norm += pick_norm == item.answer
        predictions.append({"pred": pick, "pred_norm": pick_norm, "answer": item.answer, "loglik": sums})
        if item.group is not None:
            g = groups[item.group]
            g[0] += 1
            g[1] += pick == item.answer
            g[2] += pick_norm == item.answer
    n = len(items)
    result = {
        "n": n,
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "chance": sum(1 / len(i.choices) for i in items) / n,
    }
    if groups:
        result["groups"] = {
            g: {"n": v[0], "acc": v[1] / v[0], "acc_norm": v[2] / v[0]} for g, v in sorted(groups.items())
        }
    result["predictions"] = predictions
    return result


# --- perplexity ---------------------------------------------------------------------------------------


def perplexity(text: str, fmt: Formatter, scorer, window: int, progress: bool = True) -> dict:
    """Token perplexity and bits per character. Windows overlap by one token, so every token but the
    first is scored once, each with the context its window gives."""
    ids = fmt.encode(text)
    if len(ids) < 2:
        raise _user_error("the perplexity text is shorter than two tokens")
    window = max(2, min(window, scorer.max_len))
    seqs = [ids[i : i + window] for i in range(0, len(ids) - 1, window - 1)]
    seqs = [s for s in seqs if len(s) >= 2]
    nll = -sum(sum(lp) for lp in scorer.token_logprobs(seqs, progress))
    tokens = len(ids) - 1
    return {
        "tokens": tokens,
        "chars": len(text),
        "nll": nll / tokens,
        "ppl": math.exp(nll / tokens),
        # Comparable across tokenizers (a grown vocabulary changes what a token is; characters stay).
        "bits_per_char": nll / math.log(2) / max(len(text), 1),
    }


# --- the command ---------------------------------------------------------------------------------------


def _names(paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else str(p) for s, p in zip(stems, paths)]


def format_table(results: dict) -> str:
    lines = []
    if results.get("tasks"):
        width = max(
            12,
            *(len(n) for n in results["tasks"]),
            *(len(g) + 2 for r in results["tasks"].values() for g in r.get("groups", {})),
        )
        lines.append(f"{'task'.ljust(width)}  {'n':>6}  {'acc':>6}  {'acc_norm':>8}  {'chance':>6}")
        for name, r in results["tasks"].items():
            lines.append(
                f"{name.ljust(width)}  {r['n']:>6}  {r['acc']:>6.3f}  {r['acc_norm']:>8.3f}  {r['chance']:>6.3f}"
            )
            for g, gr in r.get("groups", {}).items():
                lines.append(f"{('  ' + g).ljust(width)}  {gr['n']:>6}  {gr['acc']:>6.3f}  {gr['acc_norm']:>8.3f}")
    if results.get("perplexity"):
        if lines:
            lines.append("")
        width = max(12, *(len(n) for n in results["perplexity"]))
        lines.append(f"{'text'.ljust(width)}  {'tokens':>8}  {'ppl':>9}  {'bits/char':>9}")
        for name, r in results["perplexity"].items():
            lines.append(f"{name.ljust(width)}  {r['tokens']:>8}  {r['ppl']:>9.3f}  {r['bits_per_char']:>9.4f}")
    if results.get("passkey"):
        if lines:
            lines.append("")
        lines.append(f"{'passkey tokens':<14}  {'n':>4}  {'acc':>6}  by depth (0 → 1, fifths)")
        for length, r in results["passkey"].items():
            depths = " ".join("  -  " if a is None else f"{a:.2f}" for a in r["acc_by_depth"])
            lines.append(f"{length:<14}  {r['n']:>4}  {r['acc']:>6.3f}  {depths}")
    return "\n".join(lines)


def evaluate(
    model: str,
    tasks: list[str] = (),
    ppl: list[str] = (),
    url: str | None = None,
    served_model: str | None = None,
    chat: bool = False,
    prompt: str = DEFAULT_PROMPT,
    bos: bool = False,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    window: int = 1024,
    progress: bool = True,
    passkey: list[int] = (),
    passkey_trials: int = 40,
    passkey_filler: str | None = None,
    seed: int = 0,
) -> dict:
    import os

    from pangu_pi.tokenizer import load_tokenizer

    if "{question}" not in prompt:
        raise _user_error(f"--prompt must contain {{question}}, got {prompt!r}")
    if passkey and url:
        raise _user_error("--passkey generates with the checkpoint itself; drop --url (or score the server's "
                          "model by its folder)")
    if passkey_filler and not Path(passkey_filler).is_file():
        raise FileNotFoundError(f"--passkey-filler {passkey_filler} does not exist")
    tokenizer = load_tokenizer(model)
    items_by_task = {name: read_task(p)[:limit] for name, p in zip(_names(list(tasks)), tasks)}
    texts = {name: Path(p).read_text(encoding="utf-8") for name, p in zip(_names(list(ppl)), ppl) if Path(p).is_file()}
    missing = [p for p in ppl if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"perplexity text {missing[0]} does not exist")
    if url:
        from transformers import AutoConfig

        import pangu_pi  # noqa: F401

        max_len = 4096
        if is_checkpoint(model):
            max_len = int(getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", max_len))
        scorer = EndpointScorer(url, served_model, batch_size, max_len, os.environ.get("OPENAI_API_KEY"))
    else:
        scorer = LocalScorer(model, device, dtype, batch_size)
    fmt = Formatter(tokenizer, chat, prompt, bos)
    results = {"model": scorer.name, "chat": chat, "tasks": {}, "perplexity": {}}
    for name, items in items_by_task.items():
        results["tasks"][name] = score_multiple_choice(items, fmt, scorer, progress)
    for name, text in texts.items():
        results["perplexity"][name] = perplexity(text, fmt, scorer, window, progress)
    if passkey:
        from .passkey import DEFAULT_FILLER, passkey_accuracy

        filler = Path(passkey_filler).read_text(encoding="utf-8") if passkey_filler else DEFAULT_FILLER
        results["passkey"] = passkey_accuracy(scorer.model, tokenizer, list(passkey), passkey_trials, scorer.device,
                                              filler, seed, bos, progress)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pangu-pi eval",
        description="Multiple-choice accuracy by option log-likelihood, and perplexity, "
        "for a checkpoint or a served model.",
    )
    parser.add_argument(
        "model", help="checkpoint folder (with its tokenizer); with --url, the folder whose tokenizer the server uses"
    )
    parser.add_argument(
        "--task", nargs="+", default=[], metavar="FILE", help="multiple-choice files (CSV, JSONL, JSON)"
    )
    parser.add_argument("--ppl", nargs="+", default=[], metavar="FILE", help="held-out text files for perplexity")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument(
        "--url", help="OpenAI-compatible server, e.g. http://localhost:8000 (default: load MODEL locally)"
    )
    parser.add_argument("--model", dest="served_model", help="model name on the server (default: the first it lists)")
    parser.add_argument(
        "--chat", action="store_true", help="ask each question as a user turn through the chat template"
    )
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="plain prompt template with {question} (default %(default)r)"
    )
    parser.add_argument("--bos", action="store_true", help="start every scored sequence with the BOS token")
    parser.add_argument("--limit", type=int, help="score only the first N questions of each task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--window", type=int, default=1024, help="perplexity window in tokens")
    parser.add_argument("--passkey", nargs="+", type=int, default=[], metavar="TOKENS",
                        help="passkey retrieval at these prompt lengths in tokens (training/passkey.py)")
    parser.add_argument("--passkey-trials", type=int, default=40, help="passkey prompts per length (default 40)")
    parser.add_argument("--passkey-filler", metavar="FILE",
                        help="text to hide the key in (default: a few plain sentences, repeated)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passkey keys, depths and offsets")
    parser.add_argument("--predictions", action="store_true", help="keep per-question predictions in the JSON")
    parser.add_argument("--no-card", action="store_true",
                        help="leave the checkpoint's README.md model card as it is (default: add these results)")
    args = parser.parse_args(argv)
    if not args.task and not args.ppl and not args.passkey:
        raise _user_error("nothing to evaluate: give --task FILE..., --ppl FILE... and/or --passkey TOKENS...")
    if args.passkey_trials < 1 or any(n < 2 for n in args.passkey):
        raise _user_error("--passkey lengths must be at least 2 tokens and --passkey-trials at least 1")
    if args.served_model and not args.url:
        raise _user_error("--model names a model on a server; give the server with --url")
    results = evaluate(
        args.model,
        args.task,
        args.ppl,
        args.url,
        args.served_model,
        args.chat,
        args.prompt,
        args.bos,
        args.limit,
        args.batch_size,
        args.device,
        args.dtype,
        args.window,
        passkey=args.passkey,
        passkey_trials=args.passkey_trials,
        passkey_filler=args.passkey_filler,
        seed=args.seed,
    )
    if not args.predictions:
        for r in results["tasks"].values():
            r.pop("predictions", None)
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    if not args.url and not args.no_card and is_checkpoint(args.model):
        # Scores of these very weights (not of a server's model): they belong in the checkpoint's card.
        from pangu_pi.model_card import add_evaluation

        try:
            card = add_evaluation(args.model, results)
        except OSError as err:  # a read-only checkpoint still gets its scores printed
            print(f"model card not updated: {err}", file=sys.stderr)
        else:
            print(f"added the results to {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
