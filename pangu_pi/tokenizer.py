"""Train a SentencePiece BPE tokenizer (byte fallback, as the paper's) and save it as a transformers
fast tokenizer with special tokens and a chat template, loadable by `AutoTokenizer.from_pretrained`.

Normalisation is the identity and whitespace runs may form pieces, so any text, source code
included, encodes and decodes back to exactly itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPM_FILE = "spm.model"  # the SentencePiece model, kept so the vocabulary can be extended later

# The template of earlier releases: ChatML with `role` and `content` only. A folder holding it is
# upgraded to CHAT_TEMPLATE when loaded (`load_tokenizer`) or by `pangu-pi tokenizer template`;
# both render every such conversation to the same text.
CHAT_TEMPLATE_V1 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PREVIOUS_CHAT_TEMPLATES = (CHAT_TEMPLATE_V1,)

# ChatML (turns delimited by two special tokens no text can spell) with Hermes-style tool calling,
# the format vLLM's stock `hermes` tool parser reads (docs/serving.md, "Tool calling"):
#   - `tools` (OpenAI function schemas) are listed in the system turn, one JSON object a line,
#     inside <tools></tools>; a system message, if any, comes first in that turn;
#   - an assistant's `tool_calls` follow its content, each as
#     <tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>;
#   - a `tool` message is a turn of role `tool`: <tool_response id="CALL_ID">\nRESULT\n</tool_response>.
# Tools are rendered from their name, description and parameters alone, so a client's nulls and
# extra fields do not change the prompt. A conversation without tools renders as CHAT_TEMPLATE_V1.
CHAT_TEMPLATE = r"""
{%- for message in messages -%}
  {%- set content = message['content'] if message['content'] is string else '' -%}
  {%- if loop.first and tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if message['role'] == 'system' -%}{{- content + '\n\n' -}}{%- endif -%}
    {{- '# Tools\nYou may call one or more of these functions:\n<tools>\n' -}}
    {%- for tool in tools -%}
      {%- set fn = tool['function'] if tool['function'] is defined else tool -%}
      {{- '{"name": ' + fn['name'] | tojson -}}
      {%- if fn['description'] -%}{{- ', "description": ' + fn['description'] | tojson -}}{%- endif -%}
      {{- ', "parameters": ' + (fn['parameters'] if fn['parameters'] is mapping else {}) | tojson + '}\n' -}}
    {%- endfor -%}
    {{- '</tools>\nTo call a function, answer with its name and arguments as JSON:\n' -}}
    {{- '<tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call><|im_end|>\n' -}}
  {%- endif -%}
  {%- if loop.first and tools and message['role'] == 'system' -%}
    {#- already rendered with the tools -#}
  {%- elif message['role'] == 'assistant' -%}
    {{- '<|im_start|>assistant\n' + content -}}
    {%- for call in message['tool_calls'] or [] -%}
      {%- set fn = call['function'] if call['function'] is defined else call -%}
      {%- if content or not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '<tool_call>\n{"name": ' + fn['name'] | tojson + ', "arguments": ' -}}
      {%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}
      {%- elif fn['arguments'] is mapping -%}{{- fn['arguments'] | tojson -}}
      {%- else -%}{{- '{}' -}}
      {%- endif -%}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif message['role'] == 'tool' -%}
    {{- '<|im_start|>tool\n<tool_response' -}}
    {%- if message['tool_call_id'] -%}{{- ' id=' + message['tool_call_id'] | tojson -}}{%- endif -%}
    {{- '>\n' + content + '\n</tool_response><|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()
CHAT_TEMPLATE_FILE = "chat_template.jinja"


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

    specials = [p.piece for p in proto.pieces if p.type == 3]
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials])
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


@dataclass(frozen=True)
class TokenizerFacts:
    """What the data pipeline, the trainer and the model card read from a saved tokenizer folder."""

    folder: Path
    tokenizer: Any  # the `tokenizers.Tokenizer` of tokenizer.json
    vocab_size: int  # pieces with the added (special) tokens: the embedding rows a model needs
    eos_id: int | None  # EOS, which ends every document in the shards; None if the vocabulary lacks it

    @property
    def path(self) -> Path:
        return self.folder / "tokenizer.json"

    @functools.cached_property
    def hash(self) -> str:
        return tokenizer_hash(self.folder)

    def require_eos(self) -> int:
        if self.eos_id is None:
            from .errors import UserError

            raise UserError(f"tokenizer {self.folder} has no end-of-document token {EOS!r}, which separates "
                            "documents in the shards; use a tokenizer made by `pangu-pi tokenizer train`")
        return self.eos_id


def _no_tokenizer(folder: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"no tokenizer in {folder} (tokenizer.json missing); make one with `pangu-pi tokenizer train --out {folder}`"
    )


def tokenizer_facts(folder: str | os.PathLike) -> TokenizerFacts:
    """Read the tokenizer saved in `folder` (its tokenizer.json); FileNotFoundError names the command
    that makes one."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise _no_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return TokenizerFacts(folder, tok, tok.get_vocab_size(with_added_tokens=True), tok.token_to_id(EOS))


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
    force: bool = False,
    adopt_earlier: bool = False,
) -> Path:
    """Train and save a tokenizer into `out_dir`; with no inputs, on the embedded default corpus.

    A folder this function wrote with the same inputs and settings is reused as it is; one it wrote
    with others is refused unless `force` (then its own files are replaced); any other non-empty
    folder is refused (pangu_pi.outputs). Safe when several processes (ranks of one job) call it at
    once: one trains under a file lock, into a temporary folder moved into place; the others find it
    finished and reuse it. `adopt_earlier`: a tokenizer this function wrote before it recorded its
    settings is reused as made with these (for a cache whose folder name states them).
    """
    from filelock import FileLock

    from .corpus import default_corpus_files, expand_inputs
    from .outputs import claim_output, inputs_fingerprint, staged_output

    files = expand_inputs(inputs) if inputs else default_corpus_files()
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 256 pieces plus specials")
    out = Path(out_dir)
    settings = {"inputs": inputs_fingerprint(files), "vocab_size": vocab_size, "max_bytes": max_bytes}

    def claim():
        return claim_output(out, "tokenizer train", settings, force=force, earlier="tokenizer",
                            adopt_earlier=adopt_earlier)

    if claim().state == "same":  # a refusal, or a finished tokenizer, before any lock file is made
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        decided = claim()  # again, holding the lock: another process may have just written it
        if decided.state == "same":
            return out
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.spm-") as scratch, \
                staged_output(decided) as staged:
            spm_path = train_sentencepiece(files, os.path.join(scratch, "spm"), vocab_size, max_bytes, progress)
            fast_tokenizer_from_spm(spm_path).save_pretrained(staged)
            shutil.copy(spm_path, staged / SPM_FILE)
    return out


def stop_token_ids(tokenizer) -> list[int]:
    """The ids generation stops at: end of text and end of a chat turn (<|im_end|>), as many of the two
    as the vocabulary has. `tokenizer` is a transformers tokenizer or a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):  # the raw tokenizer.json, as a run folder keeps it
        ids = [tokenizer.token_to_id(EOS), tokenizer.token_to_id(IM_END)]
    else:
        vocab = tokenizer.get_vocab()  # added tokens included; an absent one is None, not <unk>'s id
        ids = [vocab.get(tokenizer.eos_token or EOS), vocab.get(IM_END)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generation_config(tokenizer, bos_token_id: int | None = None):
    """The generation settings of a checkpoint saved with `tokenizer`: stop at the end of text and at
    the end of a chat turn (so a chat model stops after its answer), pad with the tokenizer's pad.
    `tokenizer` is a transformers tokenizer or a `tokenizers.Tokenizer`; `bos_token_id` defaults to
    the tokenizer's. Save it with `.save_pretrained(folder)` (generation_config.json)."""
    from tokenizers import Tokenizer
    from transformers import GenerationConfig

    if isinstance(tokenizer, Tokenizer):
        bos, pad = tokenizer.token_to_id(BOS), tokenizer.token_to_id(PAD)
    else:
        bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    return GenerationConfig(bos_token_id=bos if bos_token_id is None else bos_token_id,
                            eos_token_id=stop_token_ids(tokenizer), pad_token_id=pad)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in `path`; a chat template of an earlier release is replaced by
    CHAT_TEMPLATE (same text for the chats it could render, plus tools), so whatever is saved from
    it (fine-tuned checkpoints, `pangu-pi init`) carries the current template."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise _no_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.chat_template in PREVIOUS_CHAT_TEMPLATES:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def template_status(template: str | None) -> str:
    """"current", "previous" (an earlier template of this project), "custom" or "missing"."""
    if not template:
        return "missing"
    if template.strip() == CHAT_TEMPLATE:
        return "current"
    return "previous" if template in PREVIOUS_CHAT_TEMPLATES else "custom"


def folder_chat_template(folder: str | Path) -> str | None:
    """The chat template transformers would load from `folder`: chat_template.jinja first, then the
    `chat_template` key of tokenizer_config.json."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def write_chat_template(folder: str | Path, backup: bool = True) -> str:
    """Install CHAT_TEMPLATE in a tokenizer or checkpoint folder; returns the status the folder had
    before (see `template_status`). A custom template is kept beside it as chat_template.previous.jinja."""
    from .folders import has_tokenizer

    folder = Path(folder)
    if not has_tokenizer(folder):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer (no tokenizer.json or tokenizer_config.json); pass a tokenizer folder "
            "or a checkpoint folder with its tokenizer saved in it"
        )
    before = folder_chat_template(folder)
    status = template_status(before)
    if status == "current":
        return status
    if status == "custom" and backup:
        (folder / "chat_template.previous.jinja").write_text(before, encoding="utf-8")
    (folder / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")
    # transformers reads chat_template.jinja before the config's key; drop the key anyway, so no
    # reader (older transformers, other tools) sees a stale template.
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" in data:
            del data["chat_template"]
            config.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return status
