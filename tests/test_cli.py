"""`python -m jtrain.run`: bad input gives one line on stderr, exit code 2, and writes nothing."""

from __future__ import annotations

import os

import pytest

from jtrain.run import main, parse_argv


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def _fails(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("jtrain: error: "), err
    return err


def test_missing_config_file(tmp_path, capsys):
    err = _fails(capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in err and "not found" in err


def test_unknown_key_names_closest(tmp_path, capsys):
    cfg = _write(tmp_path, "training:\n  learning_rte: 0.1\n")
    err = _fails(capsys, ["--config", cfg])
    assert "learning_rte" in err and "learning_rate" in err


def test_unknown_override_names_closest(tmp_path, capsys):
    cfg = _write(tmp_path, "training: {}\n")
    err = _fails(capsys, ["--config", cfg, "--per_device_train_bach_size", "4"])
    assert "per_device_train_batch_size" in err


def test_wrong_type(tmp_path, capsys):
    cfg = _write(tmp_path, "training:\n  learning_rate: fast\n")
    err = _fails(capsys, ["--config", cfg])
    assert "learning_rate" in err and "fast" in err


@pytest.mark.parametrize("override", [["--max_steps", "0"], ["--max_steps", "-5"], ["--num_train_epochs", "0"],
                                      ["--logging_steps", "0"]])
def test_zero_or_negative_steps(tmp_path, capsys, override):
    out = tmp_path / "out"
    cfg = _write(tmp_path, f"training:\n  output_dir: {out}\n")
    err = _fails(capsys, ["--config", cfg, *override])
    assert override[0][2:] in err
    assert not out.exists()


def test_output_dir_with_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = _write(tmp_path, f"training:\n  output_dir: {out}\n  max_steps: 2\n")
    err = _fails(capsys, ["--config", cfg])
    assert "overwrite_output_dir" in err and "notes.txt" in err
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("a file in the way")
    cfg = _write(tmp_path, f"training:\n  output_dir: {blocker}\n  max_steps: 2\n")
    err = _fails(capsys, ["--config", cfg])
    assert "not a directory" in err


def test_invalid_yaml_names_file(tmp_path, capsys):
    cfg = _write(tmp_path, "training: [unclosed\n")
    err = _fails(capsys, ["--config", cfg])
    assert "cfg.yaml" in err


def test_help_lists_options_with_defaults(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--learning_rate (default: 5e-05)" in text and "--block_size" in text


def test_print_config_resolves_overrides(tmp_path, capsys):
    cfg = _write(tmp_path, "training:\n  learning_rate: 1.0e-3\n")
    assert main(["--config", cfg, "--learning_rate", "3e-4", "--data.block_size", "64", "--print_config"]) == 0
    text = capsys.readouterr().out
    assert "learning_rate: 0.0003" in text and "block_size: 64" in text


def test_parse_argv_forms():
    cmd = parse_argv(["--config", "c.yaml", "--do_eval", "--learning_rate=1e-3", "--max_steps", "5"])
    assert cmd.config == "c.yaml"
    assert cmd.overrides == {"do_eval": "true", "learning_rate": "1e-3", "max_steps": "5"}


def test_do_train_defaults_as_in_hf_and_a_run_config_trains_unless_told_not_to(tmp_path):
    """TrainingArguments keeps HF's defaults (do_train false); a jtrain.run config trains unless it
    sets do_train false (HF-style scripts pass false for every do_* flag not given, tested in test_scripts)."""
    import transformers

    from jtrain import TrainingArguments
    from jtrain.config import load_config

    ours, theirs = TrainingArguments(), transformers.TrainingArguments(output_dir="unused")
    assert (ours.do_train, ours.do_eval, ours.do_predict) == (theirs.do_train, theirs.do_eval, theirs.do_predict)
    for text, expected in (("training: {max_steps: 2}\n", (True, False)),
                           ("training: {do_eval: true}\n", (True, True)),
                           ("model: {model_name_or_path: trained}\ntraining: {do_train: false, do_eval: true}\n",
                            (False, True))):
        cfg = load_config(_write(tmp_path, text)).training
        assert (cfg.do_train, cfg.do_eval) == expected, text
