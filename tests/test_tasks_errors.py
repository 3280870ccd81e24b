"""Bad task input: one line on stderr that names the problem and the fix, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest

from jtrain.run import main

BERT = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "max_position_embeddings": 64})


def fails(capsys, argv: list[str], out) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jtrain: error: "), err
    assert not out.exists(), "nothing may be written on bad input"
    return err[0]


@pytest.fixture
def files(tmp_path):
    rows = [{"sentence": f"text number {i}", "category": "ab"[i % 2]} for i in range(20)]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def classification(files, *extra: str) -> list[str]:
    return ["--data.task", "classification", "--source", "files", "--train_file", str(files / "cls.jsonl"),
            "--text_column", "sentence", "--label_column", "category", "--model_type", "bert", "--model.config", BERT,
            "--tokenizer.vocab_size", "100", "--max_seq_length", "32", "--output_dir", str(files / "out"),
            "--max_steps", "2", *extra]


def test_missing_label_column_names_the_columns(files, capsys):
    err = fails(capsys, classification(files, "--label_column", "gold"), files / "out")
    assert "'gold'" in err and "['sentence', 'category']" in err and "cls.jsonl" in err


def test_missing_text_column(files, capsys):
    err = fails(capsys, classification(files, "--text_columns", "sentence,premise"), files / "out")
    assert "'premise'" in err and "columns are" in err


def test_sft_needs_prompt_and_completion_columns(files, capsys):
    err = fails(capsys, ["--data.task", "sft", "--source", "files", "--train_file", str(files / "cls.jsonl"),
                         "--output_dir", str(files / "out")], files / "out")
    assert "'prompt'" in err and "columns are ['sentence', 'category']" in err


def test_model_name_that_is_not_a_directory(files, capsys):
    err = fails(capsys, ["--model_name_or_path", "meta-llama/Llama-3.2-1B", "--output_dir", str(files / "out")],
                files / "out")
    assert "never downloads" in err and "--local-dir" in err


def test_model_directory_without_config(files, capsys):
    (files / "empty_model").mkdir()
    err = fails(capsys, ["--model_name_or_path", str(files / "empty_model"), "--output_dir", str(files / "out")],
                files / "out")
    assert "has no config.json" in err


@pytest.mark.parametrize("argv, message", [
    (["--source", "files"], "do_train needs `data.train_file`"),
    (["--data.task", "classification", "--source", "files", "--train_file", "t.jsonl", "--do_eval"],
     "do_eval needs `data.validation_file`"),
    (["--train_file", "t.txt"], "data.source is 'stdlib'"),
    (["--do_train", "false", "--do_eval"], "needs `model.model_name_or_path`"),
    (["--do_predict"], "do_predict needs `data.test_file`"),
    (["--data.task", "regression"], "one of ['clm', 'classification', 'mlm', 'sft']"),
    (["--do_train", "false"], "nothing to do"),
])
def test_conflicting_options(tmp_path, capsys, argv, message):
    err = fails(capsys, [*argv, "--output_dir", str(tmp_path / "out")], tmp_path / "out")
    assert message in err


def test_task_the_architecture_lacks(files, capsys):
    (files / "t.txt").write_text("some words here\n" * 50)
    err = fails(capsys, ["--data.task", "mlm", "--source", "files", "--train_file", str(files / "t.txt"),
                         "--model_type", "llama", "--model.config", BERT, "--tokenizer.vocab_size", "100",
                         "--output_dir", str(files / "out")], files / "out")
    assert "masked_lm" in err and "llama" in err


def test_rows_longer_than_the_position_table(files, capsys):
    err = fails(capsys, classification(files, "--max_seq_length", "128"), files / "out")
    assert "128" in err and "max_position_embeddings" in err


def test_peft_section_with_a_misspelt_option(files, capsys):
    """The `peft` section runs LoRA now; a misspelt option is refused naming the closest valid one."""
    cfg = files / "lora.yaml"
    cfg.write_text(f"peft: {{r: 8, lora_aplha: 16}}\ntraining: {{output_dir: {files / 'out'}}}\n")
    err = fails(capsys, ["--config", str(cfg)], files / "out")
    assert "peft.lora_aplha" in err and "lora_alpha" in err


def test_peft_target_in_some_scanned_layers_only_is_refused(files, capsys):
    """Scanned layers share one stacked kernel per module: a regex that picks layer 0 alone cannot be honoured."""
    two_layers = BERT.replace('"num_hidden_layers": 1', '"num_hidden_layers": 2')
    layer_0_query = r"bert\.encoder\.layer\.0\.attention\.self\.query"
    err = fails(capsys, classification(files, "--peft.r", "4", "--model.scan_layers", "true", "--model.config",
                                       two_layers, "--peft.target_modules", layer_0_query), files / "out")
    assert ("selects `bert.encoder.layer.0.attention.self.query` but not "
            "`bert.encoder.layer.1.attention.self.query`") in err
    assert "scan_layers" in err


def _saved_dataset_dict(files):
    import datasets

    rows = [{"sentence": f"text number {i}", "category": "ab"[i % 2]} for i in range(20)]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:16]),
                                   "validation": datasets.Dataset.from_list(rows[16:])})
    splits.save_to_disk(str(files / "saved"))
    return files / "saved"


def test_saved_dataset_splits_train_and_evaluate(files, capsys):
    """`datasets`' save_to_disk directories are data files too: each split is `<dir>/<split>`."""
    saved = _saved_dataset_dict(files)
    argv = classification(files, "--train_file", str(saved / "train"), "--validation_file", str(saved / "validation"),
                          "--do_eval", "true", "--disable_tqdm", "true", "--report_to", "[]")
    assert main(argv) == 0
    results = json.loads((files / "out" / "all_results.json").read_text())
    assert results["train_samples"] == 16 and "eval_loss" in results


def test_saved_dataset_dict_root_and_other_directories_are_refused(files, capsys):
    saved = _saved_dataset_dict(files)
    capsys.readouterr()  # datasets' progress bars while saving
    err = fails(capsys, classification(files, "--train_file", str(saved)), files / "out")
    assert "holds a saved DatasetDict with splits ['train', 'validation']" in err and f"{saved}/train" in err
    (files / "plain").mkdir()
    err = fails(capsys, classification(files, "--train_file", str(files / "plain")), files / "out")
    assert "not one written by datasets' save_to_disk" in err
