import json
import math

import pytest
import torch

from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.cli import main as cli_main
from pangu_pi.diagnostics import analyze_model, effective_rank, feature_measures, token_windows
from pangu_pi.tokenizer import load_tokenizer, train_tokenizer

# --- known answers on constructed features -------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 16])
def test_identical_token_features_have_zero_diversity_and_rank_one(n):
    torch.manual_seed(n)
    h = torch.randn(1, 48).repeat(n, 1) * 3.7
    m = feature_measures(h)
    assert m["diversity"].item() == 0.0
    assert m["distance_per_token"].item() == 0.0
    assert m["effective_rank"].item() == pytest.approx(1.0, abs=1e-12)
    assert m["effective_rank_centered"].item() == 0.0


@pytest.mark.parametrize("n,d", [(16, 64), (32, 32), (40, 24)])
def test_random_orthogonal_features_have_full_effective_rank(n, d):
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(max(n, d), max(n, d), dtype=torch.float64))
    h = q[:n, :d]  # orthonormal rows (n ≤ d) or columns (n > d): all singular values equal
    m = feature_measures(h)
    assert m["effective_rank"].item() == pytest.approx(min(n, d), rel=1e-9)
    if n <= d:
        # ||H||² = n and ||mean||² = 1/n, so d_M² = n − 1 and the ratio is sqrt((n − 1)/n).
        assert m["diversity"].item() == pytest.approx(math.sqrt((n - 1) / n), rel=1e-9)
        assert m["effective_rank_centered"].item() == pytest.approx(n - 1, rel=1e-6)


def test_effective_rank_counts_equal_singular_values_and_ignores_scale():
    s = torch.tensor([[5.0, 5.0, 5.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert effective_rank(s).tolist() == pytest.approx([3.0, 1.0, 0.0])
    uneven = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert 1.0 < effective_rank(uneven).item() < 4.0
    assert effective_rank(uneven * 1e6).item() == pytest.approx(effective_rank(uneven).item())


def test_diversity_is_the_distance_to_the_nearest_shared_feature():
    torch.manual_seed(1)
    h = torch.randn(20, 12, dtype=torch.float64) + 5.0  # a large shared component, as in a residual stream
    m = feature_measures(h)
    d_m = m["diversity"].item() * torch.linalg.matrix_norm(h).item()
    # no other shared feature x is nearer than the mean one
    for _ in range(50):
        x = h.mean(0) + 0.1 * torch.randn(12, dtype=torch.float64)
        assert torch.linalg.matrix_norm(h - x).item() >= d_m - 1e-12
    assert m["distance_per_token"].item() == pytest.approx(d_m / math.sqrt(20))
    # scale-free, and blind to a feature shared by all tokens only through the normaliser
    assert feature_measures(h * 1e3)["diversity"].item() == pytest.approx(m["diversity"].item())
    assert feature_measures(h + 100.0)["diversity"].item() < m["diversity"].item()


def test_batched_measures_match_one_at_a_time():
    torch.manual_seed(2)
    h = torch.randn(3, 10, 8)
    batched = feature_measures(h)
    for i in range(3):
        single = feature_measures(h[i])
        for name, v in single.items():
            assert batched[name][i].item() == pytest.approx(v.item(), rel=1e-12)


def test_features_of_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="tokens, d"):
        feature_measures(torch.zeros(8))


# --- real checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(None, out, vocab_size=1024, max_bytes=1_000_000, progress=False)


@pytest.fixture(scope="module")
def checkpoints(tokenizer_dir, tmp_path_factory):
    """A tiny PanGu-π and a tiny transformers LLaMA, each saved with the tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer_dir)
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    pangu = PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", vocab_size=len(tok)))
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    dirs = {}
    for name, model in (("pangu", pangu), ("llama", llama)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from pangu_pi.corpus import default_corpus_files

    path = tmp_path_factory.mktemp("text") / "sample.py"
    path.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in default_corpus_files()[:3]))
    return path


def test_windows_pack_the_text_into_full_sequences(tokenizer_dir, text_file):
    tok = load_tokenizer(tokenizer_dir)
    windows = token_windows(tok, [text_file.read_text()], max_tokens=100, seq_len=30)
    assert windows.shape == (3, 30)
    short = token_windows(tok, ["def f(x):\n    return x\n"], max_tokens=100, seq_len=64)
    assert short.shape[0] == 1 and 2 <= short.shape[1] < 64


def test_embeddings_entry_matches_the_embedding_table_and_collapses_on_one_repeated_token(checkpoints):
    model = PanGuPiForCausalLM.from_pretrained(checkpoints["pangu"])
    same = torch.full((2, 16), 42, dtype=torch.long)  # every position holds the same token
    layers = analyze_model(model, same, progress=False)
    names = [entry["name"] for entry in layers]
    assert names == ["embeddings", "layer 1", "layer 2", "layer 3", "layer 4 (final norm)"]
    assert layers[0]["diversity"] == 0.0 and layers[0]["effective_rank"] == pytest.approx(1.0)
    # RoPE and causal attention make positions differ after the first block
    assert layers[1]["diversity"] > 0.0

    torch.manual_seed(3)
    ids = torch.randint(6, model.config.vocab_size, (3, 16))
    layers = analyze_model(model, ids, batch_size=2, progress=False)
    expected = feature_measures(model.get_input_embeddings()(ids).detach())
    for name, values in expected.items():
        assert layers[0][name] == pytest.approx(values.mean().item(), rel=1e-5)


def test_analyze_compares_pangu_pi_with_llama_end_to_end(checkpoints, text_file, tmp_path, capsys):
    out = tmp_path / "diag"
    rc = cli_main(
        ["analyze", str(checkpoints["pangu"]), str(checkpoints["llama"]), "--input", str(text_file),
         "--out", str(out), "--max-tokens", "256", "--seq-len", "64", "--label", "PanGu-π", "LLaMA",
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    results = json.loads((out / "diagnostics.json").read_text())
    by_label = {entry["label"]: entry for entry in results["models"]}
    assert set(by_label) == {"PanGu-π", "LLaMA"}
    assert by_label["PanGu-π"]["model_type"] == "pangu_pi" and by_label["LLaMA"]["model_type"] == "llama"
    for entry in results["models"]:
        assert len(entry["layers"]) == entry["num_hidden_layers"] + 1  # embeddings + each block
        assert entry["sequences"] == 4 and entry["tokens_per_sequence"] == 64
        full_rank = min(64, entry["hidden_size"])
        for layer in entry["layers"]:
            assert 0.0 < layer["diversity"] <= 1.0
            assert 1.0 <= layer["effective_rank"] <= full_rank + 1e-6
            assert layer["effective_rank_centered"] <= full_rank + 1e-6
    png = out / "diagnostics.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line_error(capsys, argv):
    capsys.readouterr()  # only what the command itself prints
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pangu-pi analyze: error: "), captured.err
    return lines[0]


def test_cli_errors_are_one_line(checkpoints, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    line = _one_line_error(capsys, ["analyze", str(missing), "--out", str(tmp_path / "o")])
    assert str(missing) in line and "checkpoint folder" in line

    both = [str(checkpoints["pangu"]), str(checkpoints["llama"])]
    line = _one_line_error(capsys, ["analyze", *both, "--out", str(tmp_path), "--label", "one"])
    assert "one label per model" in line

    bare = tmp_path / "bare"
    PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", vocab_size=512, num_hidden_layers=1)).save_pretrained(bare)
    line = _one_line_error(capsys, ["analyze", str(bare), "--out", str(tmp_path / "o")])
    assert "--tokenizer" in line

    line = _one_line_error(
        capsys, ["analyze", str(checkpoints["llama"]), "--out", str(tmp_path / "o"), "--seq-len", "1000"]
    )
    assert "lower --seq-len" in line

    nope = tmp_path / "nope.txt"
    line = _one_line_error(capsys, ["analyze", str(checkpoints["llama"]), "--out", str(tmp_path), "--input", str(nope)])
    assert "nope.txt" in line
