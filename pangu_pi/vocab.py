"""Grow a tokenizer with domain pieces, and grow a model to match (YunShan, paper §6).

Extension continues the base tokenizer's BPE on domain text: the domain text is first segmented by
the base tokenizer, then the most frequent adjacent pair is merged, again and again, until N new
pieces are learned. Each new piece is appended after the old ones with the merge that makes it, so:

- every old piece keeps its id, and the old merges keep their order;
- the new merges rank after all old ones, so any text first splits exactly as before and only then
  may join into new pieces;
- a character the base vocabulary lacks (it fell back to bytes) can become a piece of its own,
  which is what lets a tokenizer trained on one script learn another.

Pieces follow the base's SentencePiece rules: no piece holds a space except at its start, digits
stay single, and letters do not join punctuation or another script.

Resizing gives each new embedding row (and LM-head row) the mean of the rows of the old pieces that
spell it, so a new piece starts where the old model already places that text.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import json
import logging
import random
import shutil
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .tokenizer import SPM_FILE

log = logging.getLogger(__name__)

SPACE = "▁"  # SentencePiece's visible space
REPORT_FILE = "extension.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    SPM_FILE,
)
MIN_COUNT = 2  # a pair seen once is not a pattern worth a piece


# --- piece classes: what may join what -------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _char_class(ch: str) -> str:
    if ch == SPACE:
        return "space"
    cat = unicodedata.category(ch)
    if cat == "Nd":
        return "digit"  # the base splits digits (split_digits), so we keep them single too
    if cat[0] in "LM":
        name = unicodedata.name(ch, "")
        for script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL"):
            if name.startswith(script):
                return "han"
        return "letter"
    return "other"


@functools.lru_cache(maxsize=1 << 20)
def _piece_class(piece: str) -> str | None:
    """The class all of a piece's non-space characters share; None when they are mixed."""
    core = piece.lstrip(SPACE)
    if not core:
        return "space"
    classes = {_char_class(c) for c in core}
    return classes.pop() if len(classes) == 1 else None


def _may_join(left: str, right: str) -> bool:
    """Whether a piece `left + right` would obey the base's rules. Stable under merging, so text can
    be cut into words once, at the places where this is false."""
    if right.startswith(SPACE):
        return False
    right_class = _piece_class(right)
    if right_class in (None, "space", "digit"):
        return False
    if left == SPACE:
        return True  # a word's leading space
    if left.startswith(SPACE * 2) or not left.strip(SPACE):
        return False  # runs of spaces stay pieces of their own, as in the base
    return _piece_class(left) == right_class


def _units(tokens: list[str]) -> list[str]:
    """Token strings with runs of byte-fallback tokens decoded back into the characters they encode."""
    out: list[str] = []
    pending = bytearray()

    def flush() -> None:
        if not pending:
            return
        text = pending.decode("utf-8", errors="replace")
        # A character that does not decode cleanly stays as bytes: it cannot become a piece.
        out.extend(c if c != "\ufffd" else "<bytes>" for c in text)
        pending.clear()

    for t in tokens:
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            pending.append(int(t[3:5], 16))
        else:
            flush()
            out.append(t)
    flush()
    return out


def _words(units: list[str]) -> list[tuple[str, ...]]:
    words, current = [], [units[0]] if units else []
    for left, right in itertools.pairwise(units):
        if _may_join(left, right) and "<bytes>" not in (left, right):
            current.append(right)
        else:
            words.append(tuple(current))
            current = [right]
    if current:
        words.append(tuple(current))
    return words


# --- learning pieces -----------------------------------------------------------------------------


class _PieceLearner:
    """Greedy BPE continuation with incremental pair counts.

    A step either merges the most frequent adjacent pair (saving one token per occurrence) or adds a
    character the vocabulary lacks (saving its UTF-8 length minus one per occurrence), whichever
    saves more tokens on the domain text.
    """

    def __init__(self, word_counts: Counter, vocab: set[str]):
        self.known = set(vocab)
        self.words = [list(w) for w in word_counts]
        self.freqs = list(word_counts.values())
        self.pairs: Counter = Counter()
        self.chars: Counter = Counter()
        self.where: dict[tuple, set[int]] = defaultdict(set)
        self.heap: list = []
        for i in range(len(self.words)):
            self._count(i, +1)
        for key in list(self.pairs) + [(c,) for c in self.chars]:
            self._push(key)

    def _gain(self, key: tuple) -> tuple[int, int]:
        if len(key) == 2:
            n = self.pairs[key]
            return n, n
        n = self.chars[key[0]]
        return n, n * (len(key[0].encode()) - 1)

    def _push(self, key: tuple) -> None:
        count, gain = self._gain(key)
        if count >= MIN_COUNT and gain > 0:
            heapq.heappush(self.heap, (-gain, key))

    def _count(self, i: int, sign: int) -> set[tuple]:
        word, f, touched = self.words[i], self.freqs[i] * sign, set()
        for u in word:
            if u not in self.known and u != "<bytes>" and len(u) == 1:
                self.chars[u] += f
                touched.add((u,))
        for pair in itertools.pairwise(word):
            if pair[0] in self.known and pair[1] in self.known:
                self.pairs[pair] += f
                touched.add(pair)
        for key in touched:
            (self.where[key].add if sign > 0 else self.where[key].discard)(i)
        return touched

    def step(self) -> tuple[str, tuple[str, str] | None] | None:
        while self.heap:
            neg_gain, key = heapq.heappop(self.heap)
            count, gain = self._gain(key)
            if gain != -neg_gain or count < MIN_COUNT:
                continue  # stale entry; the current one was pushed when its count changed
            piece = "".join(key)
            affected = sorted(self.where[key])
            touched: set[tuple] = set()
            for i in affected:  # take the words out as counted before the change ...
                touched |= self._count(i, -1)
            self.known.add(piece)
            for i in affected:  # ... and back in as they read after it
                if len(key) == 2:
                    self.words[i] = _merge(self.words[i], *key)
                touched |= self._count(i, +1)
            for k in touched:
                if k != key:
                    self._push(k)
            return piece, (key if len(key) == 2 else None)
        return None


def _merge(word: list[str], a: str, b: str) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_pieces(
    backend, lines: list[str], add: int, progress: bool = True
) -> list[tuple[str, tuple[str, str] | None]]:
    """Up to `add` new pieces, in the order learned, each with the merge that makes it (None for a
    new character). Fewer when the text has no pair left that occurs twice."""
    vocab = set(backend.get_vocab())
    word_counts: Counter = Counter()
    batch = 2048
    for start in tqdm(range(0, len(lines), batch), desc="segmenting domain text", unit="batch", disable=not progress):
        for enc in backend.encode_batch(lines[start : start + batch], add_special_tokens=False):
            for w in _words(_units(enc.tokens)):
                if len(w) > 1 or (w and w[0] not in vocab):
                    word_counts[w] += 1
    learner = _PieceLearner(word_counts, vocab)
    pieces = []
    for _ in tqdm(range(add), desc="learning pieces", unit="piece", disable=not progress):
        got = learner.step()
        if got is None:
            break
        pieces.append(got)
    return pieces


# --- writing the extended tokenizer --------------------------------------------------------------


def _extend_tokenizer_json(data: dict, pieces: list[tuple[str, tuple[str, str] | None]]) -> dict:
    """Appends to `data` in place and returns it."""
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    next_id = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1
    for piece, pair in pieces:
        vocab[piece] = next_id
        next_id += 1
        if pair is not None:
            # The file stores merges as pairs or as "a b" strings depending on the tokenizers version.
            merges.append(list(pair) if not merges or isinstance(merges[0], list) else " ".join(pair))
    return data


def _extend_spm(src: Path, dst: Path, pieces: list[str], base_size: int) -> bool:
    """Append the pieces to the SentencePiece model, scored below every old piece so that they are
    merged last there too. Returns False (and leaves no file) when the model's ids do not line up."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(src.read_bytes())
    if len(proto.pieces) != base_size:
        log.warning("%s has %d pieces but tokenizer.json %d; not extending it", src, len(proto.pieces), base_size)
        return False
    lowest = min(p.score for p in proto.pieces)
    for k, piece in enumerate(pieces, start=1):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, lowest - k, pb.ModelProto.SentencePiece.NORMAL
    proto.trainer_spec.vocab_size = len(proto.pieces)
    dst.write_bytes(proto.SerializeToString())
    return True


@dataclass
class ExtensionReport:
    base_dir: str
    out_dir: str
    base_size: int
    new_size: int
    requested: int
    added: list[str] = field(default_factory=list)
    train_lines: int = 0
    heldout_lines: int = 0
    heldout_chars: int = 0
    tokens_per_char_before: float = 0.0
    tokens_per_char_after: float = 0.0
    roundtrip_ok: bool = True

    @property
    def compression_gain(self) -> float:
        return 1 - self.tokens_per_char_after / self.tokens_per_char_before if self.tokens_per_char_before else 0.0

    def summary(self) -> str:
        shown = ", ".join(p.replace(SPACE, " ").strip() or repr(p) for p in self.added[:12])
        lines = [
            f"added {len(self.added)} pieces: {self.base_size} -> {self.new_size}",
            (
                f"held-out domain sample ({self.heldout_lines} lines, {self.heldout_chars} chars): tokens/char "
                f"{self.tokens_per_char_before:.4f} -> {self.tokens_per_char_after:.4f} "
                f"({-100 * self.compression_gain:+.1f}%)"
            ),
            f"first new pieces: {shown}",
        ]
        if len(self.added) < self.requested:
            lines.append(
                f"note: asked for {self.requested} pieces, the domain text supports only {len(self.added)} "
                f"(no pair left that occurs {MIN_COUNT}+ times); give more domain text for more"
            )
        return "\n".join(lines)


def _domain_lines(inputs, max_bytes: int) -> list[str]:
    from .corpus import expand_inputs, read_documents

    lines, used = [], 0
    for doc in read_documents(expand_inputs(inputs)):
        for line in doc.split("\n"):
            if line.strip():
                lines.append(line)
                used += len(line)
        if used >= max_bytes:
            break
    return lines


def _tokens_per_char(backend, lines: list[str]) -> float:
    chars = sum(map(len, lines))
    tokens = sum(len(e.ids) for e in backend.encode_batch(lines, add_special_tokens=False))
    return tokens / max(chars, 1)


def extend_tokenizer(
    base_dir,
    inputs,
    add: int,
    out_dir,
    heldout_fraction: float = 0.1,
    max_bytes: int = 50_000_000,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
) -> ExtensionReport:
    """Learn `add` pieces from the domain text in `inputs` on top of the tokenizer in `base_dir`, save
    the result in `out_dir`, and report tokens per character on a held-out part of the domain text.

    `out_dir` is a new or empty folder, or (with `force`, or the same settings) one this function
    wrote before (pangu_pi.outputs). The extension carries the current chat template."""
    from tokenizers import Tokenizer

    from .corpus import expand_inputs
    from .outputs import claim_output, inputs_fingerprint, staged_output
    from .tokenizer import tokenizer_hash, write_chat_template

    base, out = Path(base_dir), Path(out_dir)
    if not (base / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no tokenizer in {base} (tokenizer.json missing); pass the folder of a saved tokenizer"
        )
    if add < 1:
        raise ValueError(f"--add must be at least 1, got {add}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction}")
    if out.resolve() == base.resolve():
        raise ValueError(f"--out {out} is the base tokenizer's folder; write the extension to a new folder")

    if isinstance(inputs, str | Path):
        inputs = [inputs]
    claim = claim_output(out, "tokenizer extend", {
        "base": tokenizer_hash(base), "inputs": inputs_fingerprint(expand_inputs(inputs)), "add": add,
        "heldout_fraction": heldout_fraction, "max_bytes": max_bytes, "seed": seed,
    }, force=force, earlier="tokenizer")
    lines = _domain_lines(inputs, max_bytes)
    if len(lines) < 2:
        raise ValueError("the domain input holds fewer than 2 non-empty lines; give it real domain text")
    random.Random(seed).shuffle(lines)
    n_heldout = max(1, int(len(lines) * heldout_fraction))
    heldout, train = lines[:n_heldout], lines[n_heldout:]

    old = Tokenizer.from_file(str(base / "tokenizer.json"))
    base_size = old.get_vocab_size(with_added_tokens=True)
    pieces = learn_pieces(old, train, add, progress)
    new_json = _extend_tokenizer_json(json.loads((base / "tokenizer.json").read_text(encoding="utf-8")), pieces)
    new = Tokenizer.from_str(json.dumps(new_json))

    report = ExtensionReport(
        base_dir=str(base),
        out_dir=str(out),
        base_size=base_size,
        new_size=new.get_vocab_size(with_added_tokens=True),
        requested=add,
        added=[p for p, _ in pieces],
        train_lines=len(train),
        heldout_lines=len(heldout),
        heldout_chars=sum(map(len, heldout)),
        tokens_per_char_before=_tokens_per_char(old, heldout),
        tokens_per_char_after=_tokens_per_char(new, heldout),
    )
    old_ids = old.get_vocab(with_added_tokens=True)
    new_ids = new.get_vocab(with_added_tokens=True)
    moved = [p for p, i in old_ids.items() if new_ids.get(p) != i]
    if moved:  # a guard on our own invariant, not on the user's input
        raise RuntimeError(f"extension changed the ids of {len(moved)} old pieces, e.g. {moved[:3]}")
    report.roundtrip_ok = all(
        new.decode(e.ids, skip_special_tokens=False) == line
        for line, e in zip(heldout, new.encode_batch(heldout, add_special_tokens=False))
    )
    if not report.roundtrip_ok:
        log.warning("some held-out lines do not decode back to themselves with the extended tokenizer")

    with staged_output(claim) as staged:
        for name in TOKENIZER_FILES:
            if (base / name).exists() and name not in ("tokenizer.json", SPM_FILE):
                shutil.copy(base / name, staged / name)
        (staged / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False, indent=2), encoding="utf-8")
        if (base / SPM_FILE).exists():
            _extend_spm(base / SPM_FILE, staged / SPM_FILE, report.added, base_size)
        # The base's template may be one of an earlier release (or none): the extension gets the current one.
        write_chat_template(staged)
        (staged / REPORT_FILE).write_text(json.dumps(asdict(report), ensure_ascii=False, indent=2), encoding="utf-8")
    return report


def extend_main(argv: list[str]) -> int:
    from .errors import UserError
    from .outputs import add_force_argument

    parser = argparse.ArgumentParser(
        prog="pangu-pi tokenizer extend",
        description="Learn new BPE pieces from domain text on top of a tokenizer; old ids stay unchanged.",
    )
    parser.add_argument("--base", required=True, help="folder of the tokenizer to extend")
    parser.add_argument("--input", required=True, nargs="+", help="domain text: files, folders or globs")
    parser.add_argument("--add", required=True, type=int, help="how many new pieces to learn")
    parser.add_argument("--out", required=True, help="folder for the extended tokenizer")
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="share of lines kept out to measure compression"
    )
    parser.add_argument("--max-bytes", type=int, default=50_000_000, help="read at most this much domain text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    add_force_argument(parser, "an extended tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="the former name of --force")
    args = parser.parse_args(argv)
    if args.overwrite:
        print("pangu-pi tokenizer extend: --overwrite is now --force (it replaces only an extension this command "
              "wrote)", file=sys.stderr)
    try:
        report = extend_tokenizer(args.base, args.input, args.add, args.out, args.heldout_fraction,
                                  args.max_bytes, args.seed, force=args.force or args.overwrite)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


# --- resizing a model ------------------------------------------------------------------------------


def _old_tokenizer_size(model_dir: Path, new_vocab: dict[str, int], tokenizer_dir: Path, config_vocab: int) -> int:
    """How many ids the model's own tokenizer had; checks that the new tokenizer keeps all of them."""
    from .errors import UserError

    own = model_dir / "tokenizer.json"
    if own.exists():
        from tokenizers import Tokenizer

        old_vocab = Tokenizer.from_file(str(own)).get_vocab(with_added_tokens=True)
        for piece, i in sorted(old_vocab.items(), key=lambda kv: kv[1]):
            if new_vocab.get(piece) != i:
                raise UserError(
                    f"tokenizer {tokenizer_dir} does not extend the model's tokenizer: piece {piece!r} has id {i} "
                    f"in {model_dir} but {new_vocab.get(piece)} in {tokenizer_dir}; extend the model's own "
                    f"tokenizer with `pangu-pi tokenizer extend --base {model_dir} ...`"
                )
        return max(old_vocab.values()) + 1
    report = tokenizer_dir / REPORT_FILE
    if report.exists():
        return int(json.loads(report.read_text())["base_size"])
    return config_vocab


def _spelling_tokenizer(new_json: dict, old_size: int):
    """The old tokenizer, rebuilt from the new one by dropping every piece and merge it added."""
    from tokenizers import Tokenizer

    data = json.loads(json.dumps(new_json))
    vocab = {p: i for p, i in data["model"]["vocab"].items() if i < old_size}
    merges = data["model"]["merges"]
    as_pair = (lambda m: tuple(m)) if merges and isinstance(merges[0], list) else (lambda m: tuple(m.split(" ", 1)))
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in merges if "".join(as_pair(m)) in vocab]
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < old_size]
    return Tokenizer.from_str(json.dumps(data))


def resize_model(model_dir, tokenizer_dir, out_dir, progress: bool = True, remote_code: bool = True,
                 force: bool = False) -> dict:
    """Grow the model in `model_dir` to the (extended) tokenizer in `tokenizer_dir` and save both to
    `out_dir`. Old rows are untouched, so logits over the old vocabulary do not change.

    `out_dir` is a new or empty folder, or (with `force`, or the same settings) one this function
    wrote before (pangu_pi.outputs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import pangu_pi  # noqa: F401  (registers the model with the Auto classes)

    from .errors import UserError
    from .folders import is_checkpoint

    model_dir, tokenizer_dir, out = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    if not is_checkpoint(model_dir):
        raise FileNotFoundError(f"no model in {model_dir} (config.json missing); pass a saved checkpoint folder")
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir} (tokenizer.json missing)")
    if out.resolve() in (model_dir.resolve(), tokenizer_dir.resolve()):
        raise UserError(f"--out {out} would overwrite an input; write the resized model to a new folder")
    from .outputs import claim_output, folder_fingerprint, staged_output
    from .tokenizer import tokenizer_hash

    settings = {"model": folder_fingerprint(model_dir), "tokenizer": tokenizer_hash(tokenizer_dir),
                "remote_code": remote_code}
    claim = claim_output(out, "resize", settings, force=force, earlier="checkpoint")

    new_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    from tokenizers import Tokenizer

    new_tok = Tokenizer.from_str(json.dumps(new_json))
    new_vocab = new_tok.get_vocab(with_added_tokens=True)
    new_size = max(new_vocab.values()) + 1
    config = AutoConfig.from_pretrained(model_dir)
    old_size = _old_tokenizer_size(model_dir, new_vocab, tokenizer_dir, config.vocab_size)
    if new_size <= old_size:
        raise UserError(
            f"tokenizer {tokenizer_dir} has {new_size} pieces and the model's tokenizer {old_size}: nothing to add; "
            "extend the tokenizer first with `pangu-pi tokenizer extend`"
        )

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    rows = max(new_size, model.get_input_embeddings().weight.shape[0])
    model.resize_token_embeddings(rows, mean_resizing=False)
    speller = _spelling_tokenizer(new_json, old_size)
    id_to_piece = {i: p for p, i in new_vocab.items()}
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == embed.data_ptr()
    spelled = {}
    with torch.no_grad():
        for i in tqdm(range(old_size, new_size), desc="initialising new rows", unit="row", disable=not progress):
            text = id_to_piece[i].replace(SPACE, " ")
            parts = speller.encode(text, add_special_tokens=False).ids
            if not parts or max(parts) >= old_size:
                raise RuntimeError(f"the old tokenizer cannot spell new piece {id_to_piece[i]!r}")
            spelled[id_to_piece[i]] = parts
            index = torch.tensor(parts)
            embed[i] = embed[index].float().mean(0).to(embed.dtype)
            if not tied:
                head[i] = head[index].float().mean(0).to(head.dtype)
    model.config.vocab_size = rows
    with staged_output(claim) as staged:
        for name in (*TOKENIZER_FILES, REPORT_FILE):  # before the weights, so the model card describes the tokenizer
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, staged / name)
        model.save_pretrained(staged, remote_code=remote_code,
                              model_card={"kind": f"vocabulary resize ({old_size} -> {rows} rows)",
                                          "base_model": str(model_dir), "name": out.name})
    return {
        "old_rows": old_size,
        "new_rows": rows,
        "initialised": new_size - old_size,
        "tied": tied,
        "spelled": spelled,
    }


def resize_main(argv: list[str]) -> int:
    from .outputs import add_force_argument
    from .remote_code import add_no_remote_code_argument

    parser = argparse.ArgumentParser(
        prog="pangu-pi resize",
        description="Grow a model's embedding and LM head to an extended tokenizer; new rows start as the "
        "mean of the old pieces that spell them.",
    )
    parser.add_argument("model", help="checkpoint folder (HF layout)")
    parser.add_argument("--tokenizer", required=True, help="folder of the extended tokenizer")
    parser.add_argument("--out", required=True, help="folder for the resized checkpoint")
    add_no_remote_code_argument(parser)
    add_force_argument(parser, "a checkpoint")
    args = parser.parse_args(argv)
    info = resize_model(args.model, args.tokenizer, args.out, remote_code=not args.no_remote_code, force=args.force)
    print(
        f"resized {args.model}: {info['old_rows']} -> {info['new_rows']} rows "
        f"({info['initialised']} new, {'tied' if info['tied'] else 'untied'} LM head); wrote {args.out}"
    )
    return 0
