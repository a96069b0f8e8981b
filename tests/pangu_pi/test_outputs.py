"""Commands that write a folder never delete what they did not write (pangu_pi.outputs).

For each of `tokenizer train`, `tokenizer extend`, `init`, `convert-llama`, `resize` and `export`:
a folder holding a stranger's `important.txt` is refused (with --force too) and left as it was; a
re-run with other settings is refused in one line; --force replaces only the command's own files.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from pangu_pi.cli import main as cli
from pangu_pi.outputs import MARKER, OutputRefused, claim_output, read_marker, staged_output

PLANTED = "important.txt"


def plant(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PLANTED).write_text("not pangu-pi's")
    return folder


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def refused(capsys, argv, *expected):
    """Run the command; it must exit 2 with one line on stderr holding every `expected` text."""
    capsys.readouterr()  # what earlier commands printed
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


# --- the helper ------------------------------------------------------------------------------------


def test_claims_new_same_replace_and_refusals(tmp_path):
    out = tmp_path / "out"
    assert claim_output(out, "init", {"seed": 0}).state == "new"
    with staged_output(claim_output(out, "init", {"seed": 0})) as staged:
        (staged / "a.txt").write_text("a")
    assert read_marker(out)["files"] == ["a.txt"] and read_marker(out)["complete"]
    assert claim_output(out, "init", {"seed": 0}).state == "same"
    with pytest.raises(OutputRefused, match=r"out was written by `pangu-pi init` with other settings \(seed 0 -> 1\)"):
        claim_output(out, "init", {"seed": 1})
    assert claim_output(out, "init", {"seed": 1}, force=True).state == "replace"
    with pytest.raises(OutputRefused, match="holds the output of `pangu-pi init`"):
        claim_output(out, "resize", {}, force=True)
    stranger = plant(tmp_path / "stranger")
    with pytest.raises(OutputRefused, match="stranger is not empty and was not written by `pangu-pi init`"):
        claim_output(stranger, "init", {}, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="is a file"):
        claim_output(tmp_path / "file", "init", {})


def test_replacing_keeps_other_files_and_drops_only_its_own_old_ones(tmp_path):
    out = tmp_path / "out"
    with staged_output(claim_output(out, "init", {"v": 1})) as staged:
        (staged / "a.txt").write_text("a1")
        (staged / "old.txt").write_text("gone next time")
        (staged / "sub").mkdir()
        (staged / "sub" / "x").write_text("x")
    plant(out)
    with staged_output(claim_output(out, "init", {"v": 2}, force=True)) as staged:
        (staged / "a.txt").write_text("a2")
        (staged / "sub").mkdir()
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "a.txt", "sub", PLANTED])
    assert (out / "a.txt").read_text() == "a2" and not any((out / "sub").iterdir())
    assert (out / PLANTED).read_text() == "not pangu-pi's"
    assert read_marker(out)["settings"] == {"v": 2}


def test_a_stranger_file_where_the_output_goes_stops_the_move_before_anything_changes(tmp_path):
    out = tmp_path / "out"
    with staged_output(claim_output(out, "init", {"v": 1})) as staged:
        (staged / "a.txt").write_text("a1")
    (out / "b.txt").write_text("theirs")
    before = snapshot(out)
    with pytest.raises(OutputRefused, match=r"b.txt was not written by `pangu-pi init`; move it out"):
        with staged_output(claim_output(out, "init", {"v": 2}, force=True)) as staged:
            (staged / "a.txt").write_text("a2")
            (staged / "b.txt").write_text("ours")
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")], "the staging folder is left"


def test_an_error_while_writing_changes_nothing(tmp_path):
    out = tmp_path / "out"
    with staged_output(claim_output(out, "init", {"v": 1})) as staged:
        (staged / "a.txt").write_text("a1")
    before = snapshot(out)
    with pytest.raises(RuntimeError), staged_output(claim_output(out, "init", {"v": 2}, force=True)) as staged:
        (staged / "a.txt").write_text("a2")
        raise RuntimeError("killed")
    assert snapshot(out) == before


def test_a_marker_naming_paths_outside_its_folder_is_no_marker(tmp_path):
    out = plant(tmp_path / "out")
    (out / MARKER).write_text(json.dumps({"command": "init", "settings": {}, "files": ["../victim"], "complete": True}))
    (tmp_path / "victim").write_text("keep")
    with pytest.raises(OutputRefused, match="was not written by"):
        claim_output(out, "init", {}, force=True)
    assert (tmp_path / "victim").read_text() == "keep"


def test_an_output_from_before_markers_is_replaced_only_with_force_and_only_if_pangu_pis(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text(json.dumps({"model_type": "pangu_pi"}))
    (earlier / "model.safetensors").write_bytes(b"old")
    with pytest.raises(OutputRefused, match="from before it recorded its settings: pass --force"):
        claim_output(earlier, "export", {}, earlier="checkpoint")
    with staged_output(claim_output(earlier, "export", {}, force=True, earlier="checkpoint")) as staged:
        (staged / "config.json").write_text("{}")
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER, "config.json"]

    downloaded = tmp_path / "llama"  # the same file names, someone else's model
    downloaded.mkdir()
    (downloaded / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (downloaded / "model.safetensors").write_bytes(b"theirs")
    with pytest.raises(OutputRefused, match="was not written by `pangu-pi export`"):
        claim_output(downloaded, "export", {}, force=True, earlier="checkpoint")
    (earlier / MARKER).unlink()
    plant(earlier)
    with pytest.raises(OutputRefused, match="was not written by"):
        claim_output(earlier, "export", {}, force=True, earlier="checkpoint")


# --- every command that writes a folder -------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pangu_pi.corpus import default_corpus_files

    return [str(f) for f in default_corpus_files(limit_bytes=300_000)]


def test_tokenizer_train(corpus, tmp_path, capsys):
    stranger = plant(tmp_path / "stranger")
    for extra in ([], ["--force"]):
        refused(capsys, ["tokenizer", "train", "--input", *corpus, "--vocab-size", "400", "--out", str(stranger),
                         *extra], f"{stranger} is not empty and was not written by `pangu-pi tokenizer train`",
                "--force")
    assert snapshot(stranger) == {PLANTED: b"not pangu-pi's"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stranger"], "a refusal left something beside it"

    out = tmp_path / "tok"
    train = ["tokenizer", "train", "--input", *corpus, "--out", str(out)]
    assert cli([*train, "--vocab-size", "400"]) == 0
    made = snapshot(out)
    assert cli([*train, "--vocab-size", "400"]) == 0  # the same settings: reused as it is
    assert snapshot(out) == made
    plant(out)
    refused(capsys, [*train, "--vocab-size", "500"], "with other settings (vocab_size 400 -> 500)", "--force")
    refused(capsys, [*train[:3], *corpus[:-1], "--out", str(out), "--vocab-size", "400"], "other settings (inputs)")
    assert cli([*train, "--vocab-size", "500", "--force"]) == 0
    assert len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]) == 500
    assert (out / PLANTED).read_text() == "not pangu-pi's"

    # A tokenizer from before the marker: refused, unless adopted (the pretraining cache does that).
    from pangu_pi.tokenizer import train_tokenizer

    (out / PLANTED).unlink()
    (out / MARKER).unlink()
    refused(capsys, [*train, "--vocab-size", "500"], "from before it recorded its settings")
    made = snapshot(out)
    assert train_tokenizer(corpus, out, vocab_size=500, adopt_earlier=True, progress=False) == out
    assert snapshot(out) == made


@pytest.fixture(scope="module")
def small_tokenizer(corpus, tmp_path_factory):
    from pangu_pi.tokenizer import train_tokenizer

    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tok", vocab_size=512, progress=False)


def test_tokenizer_extend(small_tokenizer, tmp_path, capsys):
    rng = random.Random(0)
    domain = tmp_path / "domain.txt"
    domain.write_text("\n".join(" ".join(rng.sample(["amortization", "fiduciary", "collateral", "loan", "bank"], 3))
                                for _ in range(400)))
    base = ["tokenizer", "extend", "--base", str(small_tokenizer), "--input", str(domain)]
    stranger = plant(tmp_path / "stranger")
    refused(capsys, [*base, "--add", "5", "--out", str(stranger), "--force"], "was not written by")
    assert snapshot(stranger) == {PLANTED: b"not pangu-pi's"}
    out = tmp_path / "ext"
    assert cli([*base, "--add", "5", "--out", str(out)]) == 0
    plant(out)
    refused(capsys, [*base, "--add", "6", "--out", str(out)], "other settings (add 5 -> 6)")
    assert cli([*base, "--add", "6", "--out", str(out), "--overwrite"]) == 0  # the former name of --force
    assert "--overwrite is now --force" in capsys.readouterr().err
    assert json.loads((out / "extension.json").read_text())["requested"] == 6
    assert (out / PLANTED).read_text() == "not pangu-pi's"


@pytest.fixture(scope="module")
def small_model(small_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "model"
    assert cli(["init", "--tokenizer", str(small_tokenizer), "--out", str(out),
                "--set", "siaf_backend=reference", "num_hidden_layers=1"]) == 0
    return out


def test_init(small_tokenizer, small_model, tmp_path, capsys):
    init = ["init", "--tokenizer", str(small_tokenizer), "--set", "siaf_backend=reference", "num_hidden_layers=1"]
    stranger = plant(tmp_path / "stranger")
    refused(capsys, [*init, "--out", str(stranger), "--force"], "was not written by `pangu-pi init`")
    assert snapshot(stranger) == {PLANTED: b"not pangu-pi's"}
    out = tmp_path / "model"
    assert cli([*init, "--out", str(out)]) == 0
    assert cli([*init, "--out", str(out)]) == 0  # the same settings: written again, the same weights
    plant(out)
    refused(capsys, [*init, "--out", str(out), "--seed", "1"], "with other settings (seed 0 -> 1)")
    refused(capsys, [*init, "hidden_size=64", "--out", str(out)], "with other settings (set)")
    assert cli([*init, "--out", str(out), "--seed", "1", "--force"]) == 0
    assert (out / PLANTED).read_text() == "not pangu-pi's"
    assert read_marker(out)["settings"]["seed"] == 1
    # Its output is no other command's to write into.
    refused(capsys, ["resize", str(small_model), "--tokenizer", str(small_tokenizer), "--out", str(out), "--force"],
            "holds the output of `pangu-pi init`")


def test_convert_llama(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    src = str(tmp_path / "llama")
    stranger = plant(tmp_path / "stranger")
    refused(capsys, ["convert-llama", src, str(stranger), "--force"], "was not written by `pangu-pi convert-llama`")
    assert snapshot(stranger) == {PLANTED: b"not pangu-pi's"}
    refused(capsys, ["convert-llama", src, str(tmp_path / "llama" / "pangu")], "inside the source checkpoint")
    out = tmp_path / "pangu"
    assert cli(["convert-llama", src, str(out)]) == 0
    plant(out)
    refused(capsys, ["convert-llama", src, str(out), "--shortcuts", "2"], "other settings (shortcut_count 1 -> 2)")
    assert cli(["convert-llama", src, str(out), "--shortcuts", "2", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["shortcut_count"] == 2
    torch.manual_seed(1)  # the source replaced by other weights: a re-run is another conversion
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    refused(capsys, ["convert-llama", src, str(out), "--shortcuts", "2"], "other settings (src)")
    assert (out / PLANTED).read_text() == "not pangu-pi's"


def test_resize(small_tokenizer, small_model, tmp_path, capsys):
    from pangu_pi.vocab import extend_tokenizer

    domain = tmp_path / "domain.txt"
    domain.write_text("\n".join(f"fiduciary amortization {i}" for i in range(300)))
    extended = tmp_path / "ext"
    extend_tokenizer(small_tokenizer, [domain], 4, extended, progress=False)
    resize = ["resize", str(small_model), "--tokenizer", str(extended)]
    stranger = plant(tmp_path / "stranger")
    refused(capsys, [*resize, "--out", str(stranger), "--force"], "was not written by `pangu-pi resize`")
    assert snapshot(stranger) == {PLANTED: b"not pangu-pi's"}
    out = tmp_path / "resized"
    assert cli([*resize, "--out", str(out)]) == 0
    plant(out)
    refused(capsys, [*resize, "--out", str(out), "--no-remote-code"], "other settings (remote_code True -> False)")
    assert cli([*resize, "--out", str(out), "--no-remote-code", "--force"]) == 0
    assert not (out / "modeling_pangu_pi.py").exists(), "its own file from before was left"
    assert (out / PLANTED).read_text() == "not pangu-pi's"


def test_export(pretrained_export, tmp_path, capsys):
    import shutil

    run, _ = pretrained_export
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out, extra in ((run / "hf", []), (run, ["--force"]), (run / "checkpoints" / "x", ["--force"])):
        refused(capsys, ["export", str(run), str(out), *extra], "is inside the run folder", "--force does not")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, "the run folder changed"

    stranger = plant(tmp_path / "stranger")
    refused(capsys, ["export", str(run), str(stranger), "--force"], "was not written by `pangu-pi export`")
    assert snapshot(stranger) == {PLANTED: b"not pangu-pi's"}

    out = tmp_path / "hf"
    capsys.readouterr()
    assert cli(["export", str(run), str(out)]) == 0
    assert "warning" not in capsys.readouterr().err  # the run's own checkpoint: nothing to warn about
    plant(out)
    refused(capsys, ["export", str(run), str(out), "--dtype", "bfloat16"], "other settings (dtype float32 -> bfloat16)")
    assert cli(["export", str(run), str(out), "--dtype", "bfloat16", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / PLANTED).read_text() == "not pangu-pi's"

    # A run folder someone handed over, whose checkpoint no run of that folder wrote: exported, with a warning.
    handed = tmp_path / "handed"
    shutil.copytree(run, handed)
    marker = json.loads((handed / ".pangu-pi-run.json").read_text())
    (handed / ".pangu-pi-run.json").write_text(json.dumps({**marker, "run_id": "someone-else"}))
    capsys.readouterr()
    assert cli(["export", str(handed), str(tmp_path / "handed-hf")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "no run of" in err and "torch.load(weights_only=False)" in err
