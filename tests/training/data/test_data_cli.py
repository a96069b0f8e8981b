"""`pangu-pi data prepare|verify` through the command's own entry point: summaries on success, one
line and exit status 2 on an error the user can fix."""

from __future__ import annotations

import json

import pytest

from pangu_pi.cli import main
from pangu_pi.training.data import verify_dataset


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["data", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prepare_then_verify(capsys, tokenizer_dir, text_files, tmp_path):
    code, out, err = run(capsys, "prepare", "--tokenizer", tokenizer_dir, "--input", text_files[0], text_files[1],
                         "--input", text_files[2], "--out", tmp_path / "ds", "--quiet")
    assert code == 0, err
    info = verify_dataset(tmp_path / "ds", vocab_size=2048, tokenizer_hash=None)
    assert info.num_docs == 3
    assert f"1 shards, 3 documents, {info.num_tokens:,} tokens (uint16)" in out

    code, out, err = run(capsys, "verify", tmp_path / "ds", "--tokenizer", tokenizer_dir)
    assert code == 0, err
    assert "OK, 1 shards, 3 documents" in out


def one_line_error(capsys, *args) -> str:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("pangu-pi data: error: ")
    return err


def test_a_missing_input_path_is_one_line(capsys, tokenizer_dir, tmp_path):
    err = one_line_error(capsys, "prepare", "--tokenizer", tokenizer_dir, "--input", tmp_path / "absent.jsonl",
                         "--out", tmp_path / "ds")
    assert "absent.jsonl' does not exist or matches no files" in err


def test_a_missing_tokenizer_is_one_line(capsys, text_files, tmp_path):
    err = one_line_error(capsys, "prepare", "--tokenizer", tmp_path / "tok", "--input", text_files[0],
                         "--out", tmp_path / "ds")
    assert "no tokenizer in" in err


def test_a_wrong_text_field_is_one_line(capsys, tokenizer_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x = 1"}) + "\n")
    err = one_line_error(capsys, "prepare", "--tokenizer", tokenizer_dir, "--input", tmp_path / "d.jsonl",
                         "--out", tmp_path / "ds", "--quiet")
    assert "no field 'text' (it has: 'body'); name the text field with --text-field" in err


def test_verifying_a_damaged_dataset_is_one_line(capsys, prepared, tokenizer_dir, tmp_path):
    import shutil

    ds = shutil.copytree(prepared, tmp_path / "ds")
    shard = sorted(ds.glob("shard-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-4])
    err = one_line_error(capsys, "verify", ds, "--tokenizer", tokenizer_dir)
    assert f"shard {shard} is truncated" in err


def test_an_unknown_action_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepar"])
    assert exit_.value.code == 2
    assert "invalid choice: 'prepar'" in capsys.readouterr().err
