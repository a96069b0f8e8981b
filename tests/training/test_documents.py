"""`data.document_masking` (training/documents.py): packed documents kept apart in pretraining.

Positions restart after each EOS and attention stays inside a document, so the loss of a packed row
is the sum of its documents' losses as if each were alone; under sequence parallelism (2 gloo ranks)
the per-step losses are the unsplit run's."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pangu_pi.training.documents import block_causal_mask, document_inputs, document_positions

EOS = 1


def test_positions_restart_after_each_eos():
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, EOS, 4],
                        [EOS, 3, 3, 3, 3, 3, 3, 3, 3]])
    assert document_positions(ids, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0],
                                                     [0, 0, 1, 2, 3, 4, 5, 6, 7]]


def test_mask_is_causal_inside_a_document_and_closed_across():
    positions = document_positions(torch.tensor([[5, EOS, 7, 8]]), EOS)
    assert block_causal_mask(positions)[0, 0].int().tolist() == [[1, 0, 0, 0],
                                                                 [1, 1, 0, 0],
                                                                 [0, 0, 1, 0],
                                                                 [0, 0, 1, 1]]
    assert set(document_inputs(torch.tensor([[5, EOS]]), EOS, "flash_attention_2")) == {"position_ids"}


def test_a_packed_rows_loss_is_the_sum_of_its_documents_alone():
    """The tiny preset (GQA, SIAF FFN, augmented shortcut), fp32, SDPA: with the documents' positions
    and mask, each token's loss in a packed row equals its loss with its document run by itself; without
    them the later documents' losses change (the masking is what makes the difference)."""
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM

    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset("tiny", vocab_size=64, siaf_backend="reference")
    config._attn_implementation = "sdpa"
    model = PanGuPiForCausalLM(config).eval()
    docs = [torch.randint(2, 64, (n,)).tolist() + [EOS] for n in (7, 12, 5)]
    row = torch.tensor([sum(docs, [])])

    def token_losses(ids, **kw):
        logits = model(input_ids=ids, **kw).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")

    with torch.no_grad():
        packed = token_losses(row, **document_inputs(row, EOS, "sdpa"))
        plain = token_losses(row)
        start = 0
        for doc in docs:
            alone = token_losses(torch.tensor([doc]))
            # tokens start+1 .. start+len-1 are predicted inside the document
            torch.testing.assert_close(packed[start:start + len(doc) - 1], alone, rtol=1e-5, atol=1e-5)
            start += len(doc)
    later = slice(len(docs[0]), None)
    assert (packed[later] - plain[later]).abs().max() > 1e-3


def test_fine_tuning_refuses_the_pretraining_key():
    from pangu_pi.config import ConfigError
    from pangu_pi.training.config import build_config

    with pytest.raises(ConfigError, match="data.document_masking is a pretraining key"):
        build_config({"model": {"init_from": "base"}, "data": {"datasets": ["chat.jsonl"], "document_masking": True},
                      "train": {"max_steps": 1}}, recipe="finetune", check_paths=False)
    with pytest.raises(ConfigError, match="true or false"):
        build_config({"model": {"preset": "tiny"}, "data": {"document_masking": "maybe"}, "train": {"max_steps": 1}})


# ------------------------------------------------------------------------------------------------
# Through the command, on 1 and 2 processes


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> tuple[Path, Path]:
    """A tokenizer and shards of short synthetic documents (8-40 words), several to a 64-token row."""
    from pangu_pi.tokenizer import train_tokenizer
    from pangu_pi.training.data import prepare_shards

    tmp = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    words = "the court held that a loan at five percent for three years owes interest on its principal".split()
    with open(tmp / "docs.jsonl", "w") as f:
        for _ in range(600):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))}) + "\n")
    tok = train_tokenizer([str(tmp / "docs.jsonl")], tmp / "tok", vocab_size=300, progress=False)
    shards = tmp / "shards"
    prepare_shards(tok, [str(tmp / "docs.jsonl")], shards, workers=1, progress=False)
    return tok, shards


@pytest.mark.slow
def test_document_masked_pretraining_split_over_two_ranks_reproduces_the_losses(short_documents, tmp_path):
    from test_sequence_parallel import _close, _losses, _pretrain_config, _run

    tok, shards = short_documents

    def config(sp: int, masking: bool) -> dict:
        c = _pretrain_config(tmp_path, sp)
        c["data"] = {"seq_len": 64, "tokenizer": str(tok), "datasets": [{"path": str(shards), "weight": 1.0}],
                     "val_fraction": 0.02, "document_masking": masking}
        c["train"]["max_steps"] = 6
        c["eval"] = {"every": 0}
        return c

    runs = {}
    for name, sp, masking, nproc in (("sp1", 1, True, 1), ("sp2", 2, True, 2), ("joined", 1, False, 1)):
        proc = _run("pretrain", config(sp, masking), tmp_path / name, nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _losses(tmp_path / name)
    _close(runs["sp2"], runs["sp1"], 1e-5)
    # the same rows with documents attending across each other train to other losses
    assert max(abs(runs["joined"][s] - runs["sp1"][s]) for s in runs["sp1"]) > 1e-3
