"""Train a SentencePiece BPE tokenizer (byte fallback, as the paper's) and save it as a transformers
fast tokenizer with special tokens and a chat template, loadable by `AutoTokenizer.from_pretrained`.

Normalisation is the identity and whitespace runs may form pieces, so any text, source code
included, encodes and decodes back to exactly itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPM_FILE = "spm.model"  # the SentencePiece model, kept so the vocabulary can be extended later

# ChatML: the roles' turns are delimited by two special tokens that no text can spell.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _lines(files: Iterable[Path], max_bytes: int, progress: bool) -> Iterator[str]:
    """Lines of the training text. Newline is a piece of its own, so lines lose nothing."""
    files = list(files)
    used = 0
    for f in tqdm(files, desc="reading corpus", unit="file", disable=not progress):
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        for line in text.split("\n"):
            if line:
                used += len(line)
                yield line
        if used >= max_bytes:
            return


def train_sentencepiece(
    files: Iterable[Path],
    model_prefix: str,
    vocab_size: int,
    max_bytes: int = 8_000_000,
    progress: bool = True,
    threads: int | None = None,
) -> str:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(files, max_bytes, progress),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=16384,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=[IM_START, IM_END],
        user_defined_symbols=["\n"],
        num_threads=threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return model_prefix + ".model"


def fast_tokenizer_from_spm(spm_path: str | Path):
    """A transformers fast tokenizer with the same pieces, ids and merges as the SentencePiece model."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor
    from transformers.tokenization_utils_base import generate_merges

    proto = SentencePieceExtractor(str(spm_path)).proto
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = Tokenizer(
        BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=UNK, fuse_unk=True, byte_fallback=True)
    )
    # SentencePiece writes a space as "▁"; no prefix space is added and no split is made on spaces,
    # because the pieces themselves may hold runs of whitespace (indentation).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Control pieces (type 3) are special; user-defined pieces (type 4, the newline) are matched as
    # whole pieces but decode as text.
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type == 3])
    backend.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == 4])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """A short digest of the vocabulary, stored in data shards so a shard from another tokenizer is refused."""
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    blob = json.dumps([sorted(vocab.items(), key=lambda kv: kv[1]), added], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_tokenizer(
    inputs: Iterable[str | os.PathLike] | None,
    out_dir: str | Path,
    vocab_size: int = 8192,
    max_bytes: int = 8_000_000,
    progress: bool = True,
) -> Path:
    """Train and save a tokenizer into `out_dir`; with no inputs, on the embedded default corpus.

    Safe when several processes (ranks of one job) call it at once: one trains under a file lock,
    into a temporary folder that is renamed into place; the others find it finished and reuse it.
    """
    from filelock import FileLock

    from .corpus import default_corpus_files, expand_inputs

    files = expand_inputs(inputs) if inputs else default_corpus_files()
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 256 pieces plus specials")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "tokenizer.json").exists() and (out / SPM_FILE).exists():
            return out
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            spm_path = train_sentencepiece(files, os.path.join(tmp, "spm"), vocab_size, max_bytes, progress)
            staged = Path(tmp) / "tokenizer"
            fast_tokenizer_from_spm(spm_path).save_pretrained(staged)
            shutil.copy(spm_path, staged / SPM_FILE)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staged, out)
    return out


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no tokenizer in {path} (tokenizer.json missing); make one with `pangu-pi tokenizer train --out {path}`"
        )
    return AutoTokenizer.from_pretrained(str(path))
