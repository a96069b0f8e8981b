import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pangu_pi import PanGuPiForCausalLM
from pangu_pi.cli import main as cli


def make_llama(tmp_path, tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
    )
    llama = LlamaForCausalLM(config).eval()
    src = tmp_path / "llama"
    llama.save_pretrained(src)
    return llama, src


def test_convert_llama_keeps_the_logits(tmp_path):
    llama, src = make_llama(tmp_path)
    assert cli(["convert-llama", str(src), str(tmp_path / "pangu")]) == 0
    pangu = AutoModelForCausalLM.from_pretrained(tmp_path / "pangu").eval()
    assert isinstance(pangu, PanGuPiForCausalLM)
    assert pangu.config.siaf_learn_weight and pangu.config.siaf_terms == 2 and pangu.config.shortcut_count == 1
    ids = torch.randint(0, 512, (2, 37))
    with torch.no_grad():
        assert (pangu(ids).logits - llama(ids).logits).abs().max() <= 1e-5


def test_converted_model_trains_its_new_parts(tmp_path):
    """Zero W2 and c = (1, 0) must still receive gradients, or conversion would freeze them."""
    _, src = make_llama(tmp_path)
    cli(["convert-llama", str(src), str(tmp_path / "pangu")])
    pangu = AutoModelForCausalLM.from_pretrained(tmp_path / "pangu")
    ids = torch.randint(0, 512, (2, 16))
    pangu(ids, labels=ids).loss.backward()
    layer = pangu.model.layers[0]
    assert layer.augmented_shortcuts[0].expand.weight.grad.abs().sum() > 0
    assert layer.mlp.siaf.coef.grad[1].abs().sum() > 0


def test_tied_llama_converts(tmp_path):
    llama, src = make_llama(tmp_path, tie=True)
    cli(["convert-llama", str(src), str(tmp_path / "pangu")])
    pangu = AutoModelForCausalLM.from_pretrained(tmp_path / "pangu").eval()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert (pangu(ids).logits - llama(ids).logits).abs().max() <= 1e-5


def test_non_llama_source_is_refused(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert cli(["convert-llama", str(tmp_path / "x"), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "config.json missing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
