"""The pretraining recipe (`pangu-pi pretrain`): the model (a preset, or `model.init_from` for continued
pretraining), the packed token stream (training/data) and next-token cross-entropy.

Before any compute is spent the run is checked as a whole (`prepare_run`): config keys and values,
the batch split over the processes, the tokenizer, every data shard (truncated, from another
tokenizer, ids outside the vocabulary) and, when resuming, that the checkpoint's global batch is
kept, so a bad run fails in seconds with one message. Everything else (the loop, the guard,
evaluation, checkpoints, resume) is the core's (training/core.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pangu_pi import run_layout as layout
from pangu_pi.config import ConfigError
from pangu_pi.errors import UserError

from ..checkpoint import check_resume
from ..config import BatchSplit, RunConfig
from ..core import Recipe
from ..engine import build_model
from ..evaluation import sharded_sums, token_loss_sums


@dataclass
class RunPlan:
    out: Path
    split: BatchSplit
    tokenizer_dir: Path
    datasets: list[dict]
    vocab_size: int  # the model's
    eos_id: int
    tokenizer_hash: str


def default_data(config: RunConfig, out: Path, progress: bool) -> tuple[Path, list[dict]]:
    """Tokenizer and shards from the embedded default corpus, made once and reused by later runs."""
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.tokenizer import train_tokenizer

    from ..data import DataError, prepare_shards, verify_dataset

    d = config.data
    cache = Path(d.cache_dir) if d.cache_dir else out
    part = "all" if d.default_corpus_bytes is None else str(d.default_corpus_bytes)
    files = [str(f) for f in default_corpus_files(d.default_corpus_bytes)]
    # adopt_earlier: a cache from before tokenizers recorded their settings; its name states them.
    tok_dir = train_tokenizer(files, cache / f"tokenizer-default-{part}-{d.tokenizer_vocab_size}",
                              vocab_size=d.tokenizer_vocab_size, progress=progress, adopt_earlier=True)
    shards = cache / "data" / f"default-{part}-{tok_dir.name}"
    try:
        from pangu_pi.tokenizer import tokenizer_hash

        verify_dataset(shards, vocab_size=10**9, tokenizer_hash=tokenizer_hash(tok_dir), check_ids=False)
    except (DataError, FileNotFoundError):
        prepare_shards(tok_dir, files, shards, workers=d.workers, progress=progress)
    return tok_dir, [{"path": str(shards), "weight": 1.0}]


def tokenizer_facts(tokenizer_dir: Path) -> tuple[int, int, str]:
    """(vocabulary size with specials, EOS id, hash) of a saved tokenizer (pangu_pi.tokenizer reads it)."""
    from pangu_pi.tokenizer import tokenizer_facts as read

    tok = read(tokenizer_dir)
    return tok.vocab_size, tok.require_eos(), tok.hash


def prepare_run(config: RunConfig, world_size: int, progress: bool = True) -> RunPlan:
    """Every check that can fail without a process group; builds the default data when none is configured."""
    from ..data import DataError, PackedMixture

    out = Path(config.out)
    split = check_resume(config, world_size)
    try:
        if config.data.datasets:
            tok_dir, datasets = Path(config.data.tokenizer), config.data.datasets
        else:
            tok_dir, datasets = default_data(config, out, progress)
        tok_vocab, eos_id, digest = tokenizer_facts(tok_dir)
        model = config.model_config(tok_vocab)
        if model.vocab_size < tok_vocab:
            raise ConfigError(
                f"model.vocab_size {model.vocab_size} is smaller than the tokenizer's {tok_vocab} tokens "
                f"({tok_dir}); remove model.vocab_size to take the tokenizer's, or raise it"
            )
        if model.eos_token_id not in (eos_id, [eos_id]) and not (
            isinstance(model.eos_token_id, list) and eos_id in model.eos_token_id
        ):
            raise ConfigError(f"model.eos_token_id {model.eos_token_id} is not the tokenizer's EOS id {eos_id}")
        common = dict(seq_len=config.data.seq_len, eos_id=eos_id, vocab_size=model.vocab_size,
                      tokenizer_hash=digest, val_fraction=config.data.val_fraction, seed=config.seed)
        PackedMixture(datasets, split="train", **common)  # verifies every shard
        if config.eval.every:
            val = PackedMixture(datasets, split="val", **common)
            if len(val) < world_size:
                raise UserError(
                    f"the validation split has {len(val)} samples, fewer than the {world_size} processes; "
                    "raise data.val_fraction or set eval.every=0"
                )
    except DataError as err:
        raise UserError(str(err)) from None
    return RunPlan(out, split, tok_dir, [dict(d) for d in datasets], model.vocab_size, eos_id, digest)


# ------------------------------------------------------------------------------------------------
# The recipe


class Pretraining(Recipe):
    name = "pretrain"

    def __init__(self, config: RunConfig):
        self.config = config

    def plan(self, world_size: int, progress: bool) -> RunPlan:
        return prepare_run(self.config, world_size, progress=progress)

    def setup(self, plan: RunPlan, d) -> None:
        from ..data import PackedMixture

        c = self.config
        self.plan_, self.split, self.total_steps = plan, plan.split, c.train.max_steps
        self.model_config = c.model_config(plan.vocab_size)
        self.model_config.use_cache = False
        common = dict(seq_len=c.data.seq_len, eos_id=plan.eos_id, vocab_size=plan.vocab_size,
                      tokenizer_hash=plan.tokenizer_hash, val_fraction=c.data.val_fraction, seed=c.seed)
        self.train_stream = PackedMixture(plan.datasets, split="train", **common)
        self.val_data = PackedMixture(plan.datasets, split="val", **common) if c.eval.every else None
        self.device = d.device

    def build_model(self, ds_config: dict):
        return build_model(self.model_config, ds_config, init_from=self.config.model.get("init_from"))

    def _documents(self, engine, input_ids) -> dict:
        """position_ids (and the mask) that keep a row's documents apart, with data.document_masking."""
        if not self.config.data.document_masking:
            return {}
        from ..documents import document_inputs

        model_config = getattr(getattr(engine, "module", engine), "config", self.model_config)
        attn = getattr(model_config, "_attn_implementation", None) or "sdpa"
        return document_inputs(input_ids, self.plan_.eos_id, attn)

    def loss(self, engine, batch, d):
        batch = batch.to(d.device, non_blocking=True)
        if self.sequence_parallel:  # this rank's slice of every sequence (training/sequence_parallel.py)
            # Positions only: SP rebuilds the documents' mask from the gathered positions in every
            # attention call, so building the (T, T) mask here would be work thrown away.
            positions = None
            if self.config.data.document_masking:
                from ..documents import document_positions

                positions = document_positions(batch[:, :-1], self.plan_.eos_id)
            return self.sequence_parallel.causal_lm_loss(engine, batch[:, :-1], batch[:, 1:], positions)
        # The model computes the loss (train.fused_loss: without forming the logits); the targets are
        # the inputs shifted by one.
        inputs = batch[:, :-1]
        loss = engine(input_ids=inputs, shift_labels=batch[:, 1:], **self._documents(engine, inputs)).loss
        return loss, batch[:, 1:].numel()

    def evaluate(self, engine, d) -> float:
        import torch

        def score(engine, indices):
            batch = torch.stack([self.val_data[j] for j in indices]).to(d.device)
            logits = engine(input_ids=batch[:, :-1], **self._documents(engine, batch[:, :-1])).logits
            return token_loss_sums(logits, batch[:, 1:], shift=False)

        samples = range(min(self.config.eval.samples, len(self.val_data)))
        total = sharded_sums(engine, d, samples, self.split.micro_batch_size, score, width=2)
        return (total[0] / total[1]).item()

    def checkpoint_files(self) -> dict:
        return {layout.MODEL_CONFIG: self.model_config.to_json_string(), layout.TOKENIZER: self.plan_.tokenizer_dir}

    def flops_per_token(self) -> float:
        from ..flops import flops_per_token

        return flops_per_token(self.model_config, self.config.data.seq_len)

    def describe(self, d, n_params) -> str:
        c, split = self.config, self.split
        return (f"training {n_params / 1e6:.2f} M parameters on {d.world} process(es), ZeRO-{c.train.zero_stage}, "
                f"{c.train.precision}, batch {split.global_batch_size}×{c.data.seq_len} tokens "
                f"({split.micro_batch_size} per process × {split.grad_accum} accumulation)")
