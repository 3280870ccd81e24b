"""HF example-script arguments map onto `python -m jtrain.run`'s configuration (no second pipeline).

The translation is checked by resolving both command lines to a `RunConfig` and comparing; the
scripts themselves are run end to end in tests/test_tasks.py (classification) and here (--help).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from jtrain.config import load_config
from jtrain.errors import ConfigError
from jtrain.run import parse_argv
from jtrain.tasks.hf_args import main as script_main
from jtrain.tasks.hf_args import parse_config_overrides, translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolved(argv: list[str]):
    cmd = parse_argv(argv)
    return load_config(cmd.config, cmd.overrides)


def test_run_clm_arguments_resolve_like_jtrain_run(tmp_path):
    (tmp_path / "t.txt").write_text("hello\n")
    hf = ["--model_name_or_path", str(tmp_path), "--train_file", str(tmp_path / "t.txt"), "--validation_file",
          str(tmp_path / "t.txt"), "--text_column_name", "body", "--block_size", "64", "--do_train", "--do_eval",
          "--output_dir", "out", "--learning_rate", "3e-4", "--per_device_train_batch_size", "4", "--num_train_epochs",
          "2", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--save_total_limit", "1", "--bf16",
          "--cache_dir", "x", "--preprocessing_num_workers", "4", "--ddp_timeout", "60",
          "--activation_checkpointing"]
    translated, notes = translate("clm", hf)
    ours = resolved(translated)
    direct = resolved(["--data.task", "clm", "--source", "files", "--model_name_or_path", str(tmp_path),
                       "--train_file", str(tmp_path / "t.txt"), "--validation_file", str(tmp_path / "t.txt"),
                       "--text_column", "body", "--block_size", "64", "--do_train", "--do_eval", "--do_predict",
                       "false", "--output_dir", "out", "--learning_rate", "3e-4", "--per_device_train_batch_size", "4",
                       "--num_train_epochs", "2", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1",
                       "--save_total_limit", "1", "--bf16", "--gradient_checkpointing", "true"])
    assert ours == direct and ours.training.activation_checkpointing  # transformers 5's name is honoured
    assert [n.split()[0] for n in notes] == ["--cache_dir", "--preprocessing_num_workers", "--ddp_timeout"]


def test_row_lengths_default_and_clamp_as_hfs_scripts(tmp_path, caplog):
    """HF's run_clm/run_mlm: without --block_size/--max_seq_length the row length is the tokenizer's
    model_max_length capped at 1024 (1024 when its tokenizer_config.json names none); a longer one is lowered to
    model_max_length with HF's warning. jtrain used its own 128 and passed longer values on."""
    (tmp_path / "tokenizer.json").write_text("{}")

    def length(task: str, *extra: str) -> int:
        cfg = resolved(translate(task, ["--model_name_or_path", str(tmp_path), "--train_file", "t.txt", "--do_train",
                                        *extra])[0])
        return cfg.data.block_size if task == "clm" else cfg.data.max_seq_length

    assert length("clm") == length("mlm") == 1024  # no tokenizer_config.json: HF's VERY_LARGE_INTEGER, capped
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    assert length("clm") == length("mlm") == 512 and length("classification") == 128  # run_classification: 128
    with caplog.at_level(logging.WARNING, logger="jtrain.tasks.hf_args"):
        assert length("clm", "--block_size", "2048") == 512 and length("clm", "--block_size", "64") == 64
    assert "The block_size passed (2048) is larger than the maximum length for the model (512)" in caplog.text
    no_tokenizer = resolved(translate("clm", ["--train_file", "t.txt", "--do_train"])[0])
    assert no_tokenizer.data.block_size == 128  # a tokenizer trained here (HF's scripts need one): jtrain's default


def test_run_classification_arguments(tmp_path):
    translated, _ = translate("classification", [
        "--train_file", "a.csv", "--validation_file", "b.csv", "--text_column_names", "premise,hypothesis",
        "--label_column_name", "gold", "--max_seq_length", "96", "--do_eval", "--do_train", "--max_train_samples", "50",
        "--config_overrides", "hidden_size=32,num_hidden_layers=1"])
    cfg = resolved(translated)
    assert cfg.data.task == "classification" and cfg.data.source == "files"
    assert cfg.data.text_columns == ["premise", "hypothesis"] and cfg.data.label_column == "gold"
    assert cfg.data.text_column_delimiter == " "  # run_classification.py joins them (run_glue.py pairs them)
    assert cfg.data.max_seq_length == 96 and cfg.data.max_train_samples == 50
    assert cfg.model.model_type == "bert" and cfg.model.config == {"hidden_size": 32, "num_hidden_layers": 1}
    assert (cfg.training.do_train, cfg.training.do_eval, cfg.training.do_predict) == (True, True, False)


def test_run_classification_problem_and_metric_arguments_take_effect():
    """They were accepted and ignored: a regression ran as classes of float strings, max_eval_samples cut the
    test split, the metric was always accuracy; and without text_column_names HF reads "sentence"."""
    cfg = resolved(translate("classification", ["--train_file", "a.csv", "--do_train", "--do_regression",
                                                "--metric_name", "spearmanr", "--max_predict_samples", "3"])[0])
    assert (cfg.data.do_regression, cfg.data.metric_name, cfg.data.max_predict_samples) == (True, "spearmanr", 3)
    assert cfg.data.text_column == "sentence" and cfg.data.text_column_delimiter is None
    with pytest.raises(ConfigError, match="metric_name 'bleu'"):
        resolved(translate("classification", ["--train_file", "a.csv", "--do_train", "--metric_name", "bleu"])[0])


def test_run_mlm_arguments_and_stdlib_default():
    cfg = resolved(translate("mlm", ["--do_train", "--mlm_probability", "0.2", "--max_seq_length", "64",
                                     "--validation_split_percentage", "10", "--tokenizer.vocab_size", "512"])[0])
    assert (cfg.data.task, cfg.data.source, cfg.model.model_type) == ("mlm", "stdlib", "bert")
    assert cfg.data.mlm_probability == 0.2 and cfg.data.validation_percent == 10.0
    assert cfg.tokenizer.vocab_size == 512


def test_a_jtrain_config_is_a_base_for_script_arguments(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {source: stdlib, max_files: 7}\ntraining: {do_eval: true, learning_rate: 1.0e-3}\n")
    cfg = resolved(translate("clm", ["--config", str(base), "--learning_rate", "2e-3"])[0])
    assert cfg.data.max_files == 7 and cfg.training.learning_rate == 2e-3
    assert cfg.training.do_train and cfg.training.do_eval  # the file's (and jtrain's) defaults, not HF's


def test_json_arguments_file(tmp_path):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"do_train": True, "output_dir": "o", "block_size": 32, "cache_dir": "c"}))
    cfg = resolved(translate("clm", [str(args)])[0])
    assert cfg.training.do_train and cfg.training.output_dir == "o" and cfg.data.block_size == 32


def test_config_overrides_parsing():
    assert parse_config_overrides("n_embd=10, resid_pdrop=0.2,scale_attn_weights=false") == {
        "n_embd": 10, "resid_pdrop": 0.2, "scale_attn_weights": False}
    with pytest.raises(ConfigError, match="key=value"):
        parse_config_overrides("n_embd")


@pytest.mark.parametrize("argv, message", [
    (["--dataset_name", "wikitext", "--do_train"], "never downloads"),
    (["--push_to_hub", "--do_train"], "never uploads"),
    (["--deepspeed", "ds_config.json", "--do_train"], "ZeRO-style sharding is `fsdp: full_shard`"),
    (["--train_file", "x.txt"], "nothing to do"),
    (["--do_train", "--model_name_or_path", "gpt2", "--output_dir", "OUT"], "never downloads"),
    (["--do_eval", "--train_file", "x.txt", "--output_dir", "OUT"], "evaluating without training needs `model."),
])
def test_script_refusals_are_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.replace("OUT", str(out)) for a in argv]
    assert script_main("clm", "clm", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jtrain: error: ") and message in err[0], err
    assert not out.exists()


def test_script_help_lists_mapping_and_options():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_mlm.py"), "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--text_column_name" in proc.stdout and "data.text_column" in proc.stdout
    assert "--learning_rate (default: 5e-05)" in proc.stdout and "--mlm_probability" in proc.stdout
