"""Classification data as HF's run_classification.py reads it: the problem type from the labels (float targets:
a regression; lists of classes: multi-label), the label list over every split, the "sentence" column, text
columns joined, and the metric it reports (accuracy, mse, micro-F1, or `metric_name`) computed locally."""

from __future__ import annotations

import ast
import json
import logging

import numpy as np
import pytest
from scipy import stats
from test_tasks import TINY_BERT, TRAINING, WORDS, labelled_rows, results, write_jsonl

from jtrain.config import DataSection
from jtrain.data.classification import build_classification_data, file_examples
from jtrain.data.classification_metrics import metrics_function
from jtrain.data.local_tokenizers import train_tokenizer_for
from jtrain.errors import ConfigError, DataError
from jtrain.evaluation import EvalPrediction
from jtrain.tasks.hf_args import main as script_main
from jtrain.tasks.hf_args import translate

FILLER = "the a of and with very".split()


def _rows(n: int, seed: int, kind: str) -> list[dict]:
    """A regression target (0.5 per "big" word), or the classes whose words a sentence holds (multi-label)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        if kind == "regression":
            big = int(rng.integers(0, 5))
            words = ["big"] * big + list(rng.choice(FILLER, 6 - big))
            label = 0.5 * big
        else:
            label = sorted(rng.choice(list(WORDS), int(rng.integers(1, 3)), replace=False).tolist())
            words = [w for c in label for w in rng.choice(WORDS[c].split(), 2)] + list(rng.choice(FILLER, 2))
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def _script(tmp_path, kind: str, **model: int) -> tuple[int, object]:
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", _rows(n, seed, kind))
             for split, n, seed in (("train", 300, 0), ("dev", 64, 1), ("test", 8, 2))}
    out = tmp_path / "out"
    code = script_main("classification", "classification", [
        "--model_type", "bert", "--config_overrides", ",".join(f"{k}={v}" for k, v in {**TINY_BERT, **model}.items()),
        "--tokenizer.vocab_size", "96", "--train_file", files["train"], "--validation_file", files["dev"],
        "--test_file", files["test"], "--max_seq_length", "16", "--do_train", "--do_eval", "--do_predict",
        "--output_dir", str(out), *TRAINING])
    return code, out


def test_float_labels_are_a_regression_with_hfs_mse(tmp_path, capsys):
    """No option needed: float labels make the run a regression (one output, problem_type regression, MSE),
    the text comes from HF's default "sentence" column, eval_mse (HF's default metric, from the predictions
    on the host) equals the device's mean-squared-error loss, and the model beats predicting the mean."""
    code, out = _script(tmp_path, "regression")
    assert code == 0, capsys.readouterr().err[-2000:]
    r = results(out)
    assert r["eval_mse"] == pytest.approx(r["eval_loss"], rel=1e-5)
    assert r["eval_mse"] < 0.5 * r["eval_mean_label_baseline_mse"], r
    config = json.loads((out / "config.json").read_text())
    assert (config["problem_type"], config["id2label"]) == ("regression", {"0": "LABEL_0"})
    lines = (out / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 9
    assert all(len(line.split("\t")[1].split(".")[1]) == 3 for line in lines[1:])  # HF's f"{item:3.3f}"


def test_lists_of_labels_are_multi_label_with_hfs_micro_f1(tmp_path, capsys):
    """Lists of classes: one 0/1 target per class, binary cross-entropy, micro-F1 (HF's default metric) and the
    classes whose logit is above 0 in predict_results.txt. The 32-wide tiny BERT learns one class and ties the
    other two (micro-F1 0.80 at any step count or rate tried); 64 wide, 0.91. (0.76 to 0.91 from run to run
    while the WordPiece vocabulary was trained by tokenizers' own trainer: test_tasks.py's reproducibility test.)"""
    code, out = _script(tmp_path, "multi", hidden_size=64, num_attention_heads=4)
    assert code == 0, capsys.readouterr().err[-2000:]
    r = results(out)
    assert r["eval_f1"] > 0.85, r
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and sorted(config["label2id"]) == sorted(WORDS)
    predicted = [ast.literal_eval(line.split("\t")[1]) for line in (out / "predict_results.txt").read_text()
                 .splitlines()[1:]]
    assert len(predicted) == 8 and all(set(p) <= set(WORDS) for p in predicted)


def _data(tmp_path, rows: dict, **options):
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", r) for split, r in rows.items()}
    d = DataSection(task="classification", source="files", train_file=files.get("train"),
                    validation_file=files.get("eval"), test_file=files.get("test"), max_seq_length=32, **options)
    return build_classification_data(file_examples(d, list(rows)), lambda texts: train_tokenizer_for(
        "bert", texts, vocab_size=80), d)


def test_the_label_list_covers_every_split_as_hfs(tmp_path, caplog):
    """HF adds, with a warning, an evaluation label the training split lacks; jtrain refused the run."""
    rows = {"train": [{"text": "a b", "label": 1}, {"text": "b c", "label": 2}],
            "eval": [{"text": "a c", "label": 10}, {"text": "c c", "label": 1}]}
    with caplog.at_level(logging.WARNING, logger="jtrain.data.classification"):
        data = _data(tmp_path, rows)
    # HF's order: the labels as strings, sorted as strings
    assert data.label_names == ["1", "10", "2"] and data.problem_type == "single_label_classification"
    assert "labels ['10'] in the eval split but not in the training split" in caplog.text
    np.testing.assert_array_equal(data.splits["eval"].columns["labels"], [1, 0])


def test_labels_are_ordered_as_hfs_script_orders_them(tmp_path):
    """HF's run_classification makes every label a string (its get_label_list) and sorts those, so a column of
    numbers is ordered as strings too ("10" before "2"): label ids, and the saved id2label, as HF's. jtrain
    ordered numbers numerically (ids differed from HF's from 11 classes on), and before that every label that
    read as a number."""
    texts = ["a b", "b c", "c a"]
    strings = _data(tmp_path, {"train": [{"text": t, "label": lab} for t, lab in zip(texts, ["2", "10", "3"])]})
    (tmp_path / "numbers").mkdir()
    numbers = _data(tmp_path / "numbers", {"train": [{"text": t, "label": lab} for t, lab in zip(texts, [2, 10, 3])]})
    hf_order = sorted(str(v) for v in [2, 10, 3])
    assert strings.label_names == numbers.label_names == hf_order == ["10", "2", "3"]


def test_the_label_list_and_the_problem_type_come_from_every_row_before_max_samples(tmp_path):
    """HF builds the label list from whole splits, then `select`s max_train/eval_samples rows: a training file
    ordered by class keeps every class. jtrain took the first rows first: a 2-way head here (the first rows'
    class and the evaluation one), ids that differ from HF's, and with no evaluation split a refused run."""
    rows = {"train": [{"text": f"w{i} x", "label": lab} for i, lab in enumerate("aaabbc")],
            "eval": [{"text": "x y", "label": "d"}, {"text": "y z", "label": "a"}]}
    data = _data(tmp_path, rows, max_train_samples=2, max_eval_samples=1)
    assert data.label_names == ["a", "b", "c", "d"] and data.model_config["num_labels"] == 4
    assert len(data.train) == 2 and len(data.splits["eval"].columns["labels"]) == 1


def test_shuffle_train_dataset_picks_the_rows_hfs_script_picks(tmp_path):
    """HF's run_classification shuffles the training split once (`Dataset.shuffle(seed=shuffle_seed)`) before
    `select(range(max_train_samples))`: a random subset, not the file's first rows. jtrain ignored both
    arguments. Reference: HF datasets' own shuffle of the same rows."""
    from datasets import Dataset

    rows = [{"text": f"w{i} x", "label": f"c{i:02d}"} for i in range(20)]
    picked = Dataset.from_list(rows).shuffle(seed=7).select(range(5))["label"]
    data = _data(tmp_path, {"train": rows}, max_train_samples=5, shuffle_train_dataset=True, shuffle_seed=7)
    assert [data.label_names[r["labels"]] for r in data.train] == picked
    assert picked != [r["label"] for r in rows[:5]]  # the shuffle moved them
    argv, ignored = translate("classification", ["--train_file", "t.jsonl", "--shuffle_train_dataset",
                                                 "--shuffle_seed", "7", "--max_train_samples", "5"])
    assert not ignored and {"--data.shuffle_train_dataset=true", "--data.shuffle_seed=7"} <= set(argv)


def test_minus_one_marks_unlabelled_test_rows_as_hfs(tmp_path, caplog):
    """GLUE's test files (and HF datasets' test splits) label every row -1: HF's run_classification means to
    remove -1 from the label list, with its warning, and predict those rows (its int comparison misses the
    string "-1" it made, so HF keeps it as a class: jtrain does what the script says). jtrain made "-1" a
    class (a 3-way head for two classes, every label id shifted). A -1 in the train or eval split is refused,
    saying why (HF's loss fails on it there)."""
    rows = {"train": [{"text": "a b", "label": 0}, {"text": "b c", "label": 1}, {"text": "c b", "label": 0}],
            "eval": [{"text": "a c", "label": 1}],
            "test": [{"text": "c c", "label": -1}, {"text": "a a", "label": -1}]}
    with caplog.at_level(logging.WARNING, logger="jtrain.data.classification"):
        data = _data(tmp_path, rows)
    assert data.label_names == ["0", "1"] and data.model_config["num_labels"] == 2
    assert "Label -1 found in label list, removing it" in caplog.text
    np.testing.assert_array_equal(data.splits["test"].columns["labels"], [-100, -100])  # unlabelled: predicted only
    np.testing.assert_array_equal(data.splits["eval"].columns["labels"], [1])
    assert "test" not in data.baselines and "eval" in data.baselines
    rows["eval"].append({"text": "b b", "label": -1})
    with pytest.raises(DataError, match=r"the eval split has a label the model does not know: '-1' \(-1 marks an "
                                        r"unlabelled row"):
        (tmp_path / "eval").mkdir()
        _data(tmp_path / "eval", rows)


def _with_known(tmp_path, rows: dict, known: list[str]):
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", r) for s, r in rows.items()}
    d = DataSection(task="classification", source="files", train_file=files.get("train"),
                    validation_file=files.get("eval"))
    return build_classification_data(file_examples(d, list(rows)), lambda _: train_tokenizer_for(
        "bert", ["a b", "b c"], vocab_size=80), d, known_labels=known)


def test_a_label_a_pretrained_classifier_does_not_know_is_an_error(tmp_path):
    """Evaluating a pretrained classifier (nothing trained), HF maps labels through its config's label2id: an
    unknown label cannot get an id: refused, naming the split, the label and the known ones."""
    with pytest.raises(DataError, match=r"the eval split has a label the model does not know: 'zz'; known: \['neg', "
                                        r"'pos'\]"):
        _with_known(tmp_path, {"eval": [{"text": "a b", "label": "zz"}]}, ["neg", "pos"])


def test_training_a_pretrained_classifier_takes_the_datas_labels_as_hf(tmp_path, caplog):
    """HF's run_classification, training, builds the label list from the data and overwrites the checkpoint's
    label2id with a warning (fine-tuning a classifier on other labels). jtrain kept the checkpoint's labels and
    refused every row whose label it did not know. Labels the classifier all has keep its order, so its head's
    rows keep their meaning (HF re-sorts them; the same here unless the checkpoint's order is unsorted)."""
    rows = {"train": [{"text": "a b", "label": 0}, {"text": "b c", "label": 1}], "eval": [{"text": "a c", "label": 1}]}
    with caplog.at_level(logging.WARNING, logger="jtrain.data.classification"):
        data = _with_known(tmp_path, rows, ["NEGATIVE", "POSITIVE"])
    assert data.label_names == ["0", "1"] and "The label2id key in the model config.json is not equal" in caplog.text
    np.testing.assert_array_equal(data.splits["eval"].columns["labels"], [1])
    (tmp_path / "known").mkdir()
    rows = {"train": [{"text": "a b", "label": "neg"}, {"text": "b c", "label": "pos"}]}
    assert _with_known(tmp_path / "known", rows, ["pos", "neg", "mixed"]).label_names == ["pos", "neg", "mixed"]


def test_do_regression_overrides_the_label_type(tmp_path):
    floats = {"train": [{"text": "a b", "label": 0.5}, {"text": "b c", "label": 1.5}]}
    assert _data(tmp_path, floats).problem_type == "regression"
    as_classes = _data(tmp_path, floats, do_regression=False)
    assert as_classes.label_names == ["0.5", "1.5"] and as_classes.model_config["num_labels"] == 2
    ints = {"train": [{"text": "a b", "label": 0}, {"text": "b c", "label": 3}]}
    assert _data(tmp_path, ints).problem_type == "single_label_classification"  # integer labels are classes
    regression = _data(tmp_path, ints, do_regression=True)
    assert regression.model_config == {"num_labels": 1, "problem_type": "regression"}
    np.testing.assert_array_equal(regression.train[1]["labels"], np.float32(3.0))
    with pytest.raises(DataError, match="'x', which a regression cannot read as a number"):
        _data(tmp_path, {"train": [{"text": "a", "label": "x"}, {"text": "b", "label": 1}]}, do_regression=True)


def test_text_columns_join_with_the_delimiter(tmp_path):
    rows = {"train": [{"p": "a b", "h": "c", "label": 0}, {"p": "c", "h": "b a", "label": 1}]}
    joined = _data(tmp_path, rows, text_columns=["p", "h"], text_column_delimiter=" ")
    pair = _data(tmp_path, rows, text_columns=["p", "h"])
    assert "token_type_ids" not in joined.train[0] and set(pair.train[0]["token_type_ids"]) == {0, 1}
    assert len(joined.train[0]["input_ids"]) == len(pair.train[0]["input_ids"]) - 1  # one [SEP] fewer


def test_metrics_are_evaluates_definitions():
    """Against scipy (correlations) and hand-counted confusion entries."""
    logits = np.array([[2.0, -1.0], [0.5, 1.0], [-1.0, 3.0], [1.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 1, 0, 0, 1])  # predictions 0, 1, 1, 0, 1: tp 2, fp 1, fn 0, tn 2
    pred = EvalPrediction(predictions=logits, label_ids=labels)
    scores = {name: metrics_function("single_label_classification", name, 2)(pred)[name]
              for name in ("f1", "precision", "recall", "matthews_correlation")}
    phi = (2 * 2 - 1 * 0) / np.sqrt(3 * 2 * 2 * 3)
    assert scores == pytest.approx({"f1": 4 / 5, "precision": 2 / 3, "recall": 1.0, "matthews_correlation": phi})
    assert metrics_function("single_label_classification", None, 2) is None  # the device's eval_accuracy
    targets = np.array([0.1, 0.9, 0.4, 1.5, 0.2])
    outputs = EvalPrediction(predictions=np.array([[0.2], [0.7], [0.3], [1.1], [0.5]]), label_ids=targets)
    for name, reference in (("pearsonr", stats.pearsonr), ("spearmanr", stats.spearmanr)):
        got = metrics_function("regression", name, 1)(outputs)[name]
        assert got == pytest.approx(reference(outputs.predictions[:, 0], targets)[0], rel=1e-12)
    # squared errors .01 .04 .01 .16 .09
    assert metrics_function("regression", None, 1)(outputs) == {"mse": pytest.approx(0.31 / 5)}
    multi = EvalPrediction(predictions=np.array([[1.0, -1.0, 2.0], [-1.0, 1.0, -1.0]]),
                           label_ids=np.array([[1, 0, 0], [0, 1, 0]]))  # tp 2, fp 1, fn 0
    assert metrics_function("multi_label_classification", None, 3)(multi) == {"f1": pytest.approx(0.8)}
    for bad, message in ((("single_label_classification", "f1", 3), "binary"),
                         (("regression", "accuracy", 1), "does not score a regression"),
                         (("regression", "bleu", 1), "computes accuracy")):
        with pytest.raises(ConfigError, match=message):
            metrics_function(*bad)


def test_fine_tuning_a_classifier_on_other_labels_runs_as_hfs_script(tmp_path, capsys):
    """HF's run_classification fine-tunes a saved 3-class classifier on 2 new labels with
    `--ignore_mismatched_sizes` (the head afresh, the data's labels in config.json) and refuses without it.
    jtrain refused both: the checkpoint's labels were kept, so every new label was unknown."""
    three = [{"sentence": r["sentence"], "label": r["category"]} for r in labelled_rows(48, 0)]
    two = [{"sentence": r["sentence"], "label": int(r["category"] == "fruit")} for r in labelled_rows(48, 1)]
    run = ["--max_steps", "2", "--per_device_train_batch_size", "16", "--disable_tqdm", "--mesh_shape", "{data: 1}",
           "--max_seq_length", "16", "--do_train"]
    first = tmp_path / "first"
    code = script_main("classification", "classification", [
        "--model_type", "bert", "--config_overrides", ",".join(f"{k}={v}" for k, v in TINY_BERT.items()),
        "--tokenizer.vocab_size", "128", "--train_file", write_jsonl(tmp_path / "three.jsonl", three),
        "--output_dir", str(first), *run])
    assert code == 0, capsys.readouterr().err[-2000:]
    again = ["--model_name_or_path", str(first), "--train_file", write_jsonl(tmp_path / "two.jsonl", two), *run]
    code = script_main("classification", "classification", [*again, "--output_dir", str(tmp_path / "refused")])
    assert code != 0 and "ignore_mismatched_sizes=True" in capsys.readouterr().err
    code = script_main("classification", "classification", [*again, "--output_dir", str(tmp_path / "tuned"),
                                                            "--ignore_mismatched_sizes"])
    assert code == 0, capsys.readouterr().err[-2000:]
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}


def test_a_resumed_classification_keeps_its_checkpoints_label_order(tmp_path):
    """A run resumed from a checkpoint maps labels to the ids its head was trained with: the checkpoint's
    config.json id2label, even when this jtrain would order the data's labels otherwise (numbers were
    ordered numerically before jtrain took HF's string order). Without it a resumed 12-class run would
    silently swap the meaning of ids 2-11."""
    from jtrain.config import load_config
    from jtrain.pipeline import prepare_data

    rows = [{"text": f"w{i} x", "label": i % 12} for i in range(24)]
    cfg = load_config(None, {"data.task": "classification", "data.source": "files", "data.max_seq_length": 16,
                             "data.train_file": write_jsonl(tmp_path / "t.jsonl", rows), "training.do_train": True,
                             "training.output_dir": str(tmp_path / "out"), "tokenizer.vocab_size": 80})
    numeric = [str(i) for i in range(12)]
    checkpoint = tmp_path / "out" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"id2label": dict(enumerate(numeric))}))
    assert prepare_data(cfg, "bert", {}).label_names == sorted(numeric)  # a fresh run: HF's order, "10" first
    assert prepare_data(cfg, "bert", {}, resume=str(checkpoint)).label_names == numeric
