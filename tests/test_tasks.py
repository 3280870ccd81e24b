"""Every task end to end on tiny configs (in-process `jtrain.run`): the metric beats its baseline.

The data are small learnable files written here (nothing is downloaded); the shipped configs run
the same code on standard-library text. Classification runs through `scripts/run_classification.py`'s
HF arguments, so the script translation is tested end to end as well.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jtrain.run import main
from jtrain.tasks.hf_args import main as script_main

TINY_BERT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "tie_word_embeddings": True}
# Tiny models: compiling dominates, so 120 steps cost little more than 40.
TRAINING = ["--max_steps", "120", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
            "--learning_rate", "1e-2", "--logging_steps", "40", "--save_steps", "120", "--disable_tqdm",
            "--mesh_shape", "{data: 1}"]
WORDS = {"fruit": "apple banana cherry grape mango", "tool": "hammer wrench saw drill pliers",
         "animal": "tiger horse zebra otter eagle"}
FILLER = "the a of and with very big small".split()
CYCLE = "one two three four five six seven eight nine ten".split()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def labelled_rows(n: int, seed: int) -> list[dict]:
    """Three classes told apart by their words among shared filler."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = str(rng.choice(list(WORDS)))
        words = list(rng.choice(WORDS[label].split(), 2)) + list(rng.choice(FILLER, 4))
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "category": label})
    return rows


def cyclic_lines(n: int, seed: int) -> str:
    """Lines of consecutive words of a 10-word cycle: each word is predictable from its neighbours."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        start = int(rng.integers(len(CYCLE)))
        lines.append(" ".join(CYCLE[(start + i) % len(CYCLE)] for i in range(12)))
    return "\n".join(lines) + "\n"


def results(out) -> dict:
    return json.loads((out / "all_results.json").read_text())


def test_classification_via_hf_script_beats_majority(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_rows(300, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", labelled_rows(64, 1))
    test = write_jsonl(tmp_path / "test.jsonl", [{"sentence": r["sentence"]} for r in labelled_rows(10, 2)])
    out = tmp_path / "out"
    code = script_main("classification", "classification", [
        "--model_type", "bert", "--config_overrides", ",".join(f"{k}={v}" for k, v in TINY_BERT.items()),
        "--tokenizer.vocab_size", "128", "--train_file", train, "--validation_file", dev, "--test_file", test,
        "--text_column_names", "sentence", "--label_column_name", "category", "--max_seq_length", "16",
        "--do_train", "--do_eval", "--do_predict", "--output_dir", str(out), "--cache_dir", "ignored", *TRAINING])
    assert code == 0, capsys.readouterr().err[-2000:]
    r = results(out)
    assert r["eval_accuracy"] > r["eval_majority_class_baseline_accuracy"] + 0.3, r
    assert "vs majority-class baseline" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert sorted(config["label2id"]) == ["animal", "fruit", "tool"]
    predictions = (out / "predict_results.txt").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 11
    assert {line.split("\t")[1] for line in predictions[1:]} <= set(WORDS)
    for name in ("train_results.json", "eval_results.json", "test_results.json", "trainer_state.json",
                 "tokenizer.json", "model.safetensors"):
        assert (out / name).is_file(), name


def topic_lines(n: int, seed: int) -> str:
    """Lines of 30 words from one of six 3-word topics: a masked word is one of its line's topic words.

    With [CLS] and [SEP] a line is exactly one 32-token row, so every row holds one topic.
    """
    topics = [t.split() for t in ("red green blue", "cat dog cow", "oak elm ash", "tea gin rum", "sun moon star",
                                  "car bus van")]
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(topics[int(rng.integers(6))], 30)) + "\n" for _ in range(n))


def test_mlm_beats_most_frequent_token(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(topic_lines(300, 0))
    (tmp_path / "dev.txt").write_text(topic_lines(40, 1))
    out = tmp_path / "out"
    code = main(["--data.task", "mlm", "--source", "files", "--train_file", str(tmp_path / "train.txt"),
                 "--validation_file", str(tmp_path / "dev.txt"), "--max_seq_length", "32", "--model_type", "bert",
                 "--model.config", json.dumps(TINY_BERT), "--tokenizer.vocab_size", "96",
                 "--output_dir", str(out), "--do_eval", *TRAINING, "--max_steps", "200"])
    assert code == 0, capsys.readouterr().err[-2000:]
    r = results(out)
    # Knowing the topic gives about 1/3 (0.27 after 120 steps); the most frequent word alone about 1/10.
    assert r["eval_accuracy"] > r["eval_most_frequent_token_baseline_accuracy"] + 0.1, r
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


def test_sft_completion_only_beats_unigram(tmp_path, capsys):
    colors = {"apple": "red", "banana": "yellow", "grape": "purple", "lime": "green", "plum": "violet"}
    rows = [{"prompt": f"{q} colour of the {fruit}?", "completion": f" It is {colour}."}
            for fruit, colour in colors.items() for q in ("What is the", "Tell me the", "Say the", "Name the")]
    train = write_jsonl(tmp_path / "train.jsonl", rows * 4)
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[::3])
    out = tmp_path / "out"
    code = main(["--data.task", "sft", "--source", "files", "--train_file", train, "--validation_file", dev,
                 "--max_seq_length", "32", "--model.config", json.dumps(TINY_LLAMA), "--tokenizer.vocab_size", "300",
                 "--output_dir", str(out), "--do_eval", *TRAINING])
    assert code == 0, capsys.readouterr().err[-2000:]
    r = results(out)
    assert r["eval_loss"] < r["eval_unigram_baseline_loss"] - 1.0, r


def test_clm_from_files_then_reload_evaluates_identically(tmp_path, capsys):
    """Train from scratch, then `model_name_or_path` on the saved directory: same eval loss."""
    (tmp_path / "train.txt").write_text(cyclic_lines(300, 0))
    (tmp_path / "dev.txt").write_text(cyclic_lines(40, 1))
    files = ["--data.task", "clm", "--source", "files", "--train_file", str(tmp_path / "train.txt"),
             "--validation_file", str(tmp_path / "dev.txt"), "--block_size", "32", "--do_eval"]
    first = tmp_path / "first"
    code = main([*files, "--model.config", json.dumps(TINY_LLAMA), "--tokenizer.vocab_size", "128",
                 "--output_dir", str(first), *TRAINING])
    assert code == 0, capsys.readouterr().err[-2000:]
    trained = results(first)
    assert trained["eval_loss"] < trained["eval_unigram_baseline_loss"] - 0.5, trained
    assert json.loads((first / "tokenizer_config.json").read_text())["eos_token"] == "</s>"  # for AutoTokenizer
    again = tmp_path / "again"
    code = main([*files, "--do_train", "false", "--model_name_or_path", str(first), "--output_dir", str(again),
                 "--disable_tqdm", "--mesh_shape", "{data: 1}", "--per_device_eval_batch_size", "32"])
    assert code == 0, capsys.readouterr().err[-2000:]
    # Same weights, same tokens, same eval rows: float32 sums in the same order agree to rounding.
    assert abs(results(again)["eval_loss"] - trained["eval_loss"]) < 1e-5
    assert not (again / "trainer_state.json").exists() and (again / "eval_results.json").is_file()


@pytest.mark.parametrize("task", ["classification", "sft", "mlm"])
def test_stdlib_sources_are_held_out_by_file(task):
    """The no-download data of each task: held-out texts never occur in training."""
    from jtrain.config import DataSection
    from jtrain.data import classification, mlm, sft

    d = DataSection(task=task, stdlib_packages=["json", "email", "logging", "unittest"], validation_percent=20)
    found = {"classification": classification.stdlib_examples, "sft": sft.stdlib_pairs,
             "mlm": mlm.stdlib_texts}[task](d)
    assert found["train"] and found["eval"]
    assert not set(map(str, found["train"])) & set(map(str, found["eval"]))
    if task == "classification":
        assert {e.label for e in found["eval"]} == {"json", "email", "logging", "unittest"}


def test_stdlib_classification_splits_whole_files():
    from jtrain.data.stdlib_text import DEFAULT_CLASSES, split_by_file, stdlib_docstrings

    splits = split_by_file(stdlib_docstrings(DEFAULT_CLASSES[:4]), 20, per_package=True)
    assert not {d.file for d in splits.train} & {d.file for d in splits.validation}
    for package in DEFAULT_CLASSES[:4]:
        n_train = sum(d.package == package for d in splits.train)
        n_val = sum(d.package == package for d in splits.validation)
        assert n_train > n_val > 0, (package, n_train, n_val)


def test_sentence_pairs_get_token_types(tmp_path):
    from jtrain.config import DataSection
    from jtrain.data.classification import build_classification_data, file_examples
    from jtrain.data.local_tokenizers import train_tokenizer_for

    rows = [{"a": r["sentence"], "b": r["sentence"][::-1], "label": i % 2} for i, r in enumerate(labelled_rows(8, 0))]
    d = DataSection(task="classification", source="files", train_file=write_jsonl(tmp_path / "t.jsonl", rows),
                    text_columns=["a", "b"], max_seq_length=64)
    data = build_classification_data(file_examples(d, ["train"]), lambda texts: train_tokenizer_for(
        "bert", texts, vocab_size=100), d)
    row = data.train[0]
    assert set(row["token_type_ids"]) == {0, 1} and len(row["token_type_ids"]) == len(row["input_ids"])
    assert data.model_config == {"num_labels": 2, "id2label": {0: "0", 1: "1"},
                                 "problem_type": "single_label_classification"}
    assert data.collator(data.train[:4])["input_ids"].shape[1] in (32, 64)


def test_wordpiece_training_gives_one_vocabulary_on_every_run():
    """tokenizers' WordPieceTrainer numbered its `##` pieces in hash-map order and broke ties between merges by
    them: each process trained another vocabulary from the same texts (ids permuted, a few tokens different), and
    a model trained on it other results (a tiny classifier's micro-F1: 0.76 to 0.91). jtrain's training is the same
    BPE with those pieces in its sorted alphabet: two processes (each with its own hash seeds) give one vocabulary,
    with HF's trainer's alphabet and size; its merges differ from one HF run only where HF's broke a tie (measured
    on the standard library's docstrings at 4096: 8 of 4096 tokens, all of 200 docstrings tokenized alike)."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from jtrain.data.local_tokenizers import BERT_SPECIALS, train_wordpiece_tokenizer

    words = "apple banana cherry grape mango hammer wrench saw drill pliers tiger horse zebra otter eagle".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 6)) for _ in range(300)]
    code = ("import json, sys; from jtrain.data.local_tokenizers import train_wordpiece_tokenizer as train; "
            "print(json.dumps(sorted(train(json.loads(sys.stdin.read()), 96).get_vocab().items())))")
    runs = [subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    ours = train_wordpiece_tokenizer(texts, 96)
    hf = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                               lowercase=False)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=96, special_tokens=list(BERT_SPECIALS),
                                                            show_progress=False))
    # HF's trainer differs from run to run in its tie-broken merges; its alphabet and `##` pieces do not
    alphabet = lambda tok: {t for t in tok.get_vocab() if len(t.removeprefix("##")) == 1}  # noqa: E731
    assert alphabet(ours) == alphabet(hf) and ours.get_vocab_size() == hf.get_vocab_size() == 96
    assert [ours.token_to_id(t) for t in BERT_SPECIALS] == [0, 1, 2, 3, 4]
    assert ours.encode("zebra quick mango").tokens == ["zebra", "[UNK]", "mango"]  # no q, u or k in the texts


def test_resumed_run_reuses_the_saved_tokenizer(tmp_path):
    """Retraining on other text (another sample, an edited corpus) would change the ids, so a resume loads
    output_dir's tokenizer."""
    from jtrain.config import load_config
    from jtrain.data.local_tokenizers import train_tokenizer_for
    from jtrain.pipeline import tokenizer_factory

    saved = train_tokenizer_for("bert", ["alpha beta gamma"] * 5, vocab_size=80)
    saved.save(str(tmp_path / "tokenizer.json"))
    cfg = load_config(None, {"output_dir": str(tmp_path), "model_type": "bert"})
    other_text = ["completely different words here"] * 5
    assert tokenizer_factory(cfg, "bert", resuming=True)(other_text).get_vocab() == saved.get_vocab()
    assert tokenizer_factory(cfg, "bert", resuming=False)(other_text).get_vocab() != saved.get_vocab()


@pytest.mark.parametrize("model_type, config", [("llama", {"max_position_embeddings": 256}),
                                                ("roberta", {"max_position_embeddings": 130, "pad_token_id": 1}),
                                                ("bert", {"max_position_embeddings": 64})])
def test_a_saved_local_tokenizer_loads_in_transformers_with_its_special_tokens(tmp_path, model_type, config):
    """HF's Trainer saves a tokenizer that `AutoTokenizer.from_pretrained(output_dir)` returns with its pad,
    eos, bos, ... tokens and the model's length. jtrain wrote tokenizer.json alone: no pad or eos token and an
    unbounded model_max_length there (a Llama's generation never stops; HF's padding collators refuse it)."""
    import transformers
    from types import SimpleNamespace

    from jtrain.data.local_tokenizers import save_tokenizer, train_tokenizer_for

    texts = [" ".join(CYCLE[i:] + CYCLE[:i]) for i in range(len(CYCLE))] * 5
    tok = train_tokenizer_for(model_type, texts, vocab_size=200)
    save_tokenizer(tok, str(tmp_path), SimpleNamespace(model_type=model_type, **config))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    sample = ["one two three", "ten nine eight seven"]
    assert loaded(sample)["input_ids"] == [e.ids for e in tok.encode_batch(sample)]  # the template, as jtrain's
    expected = {"llama": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
                "roberta": {"pad_token": "<pad>", "unk_token": "<unk>", "cls_token": "<s>", "sep_token": "</s>",
                            "mask_token": "<mask>"},
                "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                         "mask_token": "[MASK]"}}[model_type]
    assert {k: getattr(loaded, k) for k in expected} == expected
    assert loaded.model_max_length == {"llama": 256, "roberta": 128, "bert": 64}[model_type]


def test_without_a_validation_file_clm_and_mlm_evaluate_on_the_first_percent_as_hf(tmp_path):
    """HF's run_clm/run_mlm with --do_eval and no validation file evaluate on `train[:5%]` of the training file
    and train on `train[5%:]` (validation_split_percentage). jtrain refused the run. Reference: datasets' own
    percent slicing of the same file."""
    import datasets

    from jtrain import TrainingArguments
    from jtrain.config import DataSection, RunConfig, check_run_config
    from jtrain.data.text_lm import file_texts
    from jtrain.errors import DataError

    lines = [f"line {i} " + " ".join(CYCLE[: 1 + i % 9]) for i in range(50)]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    for task in ("clm", "mlm"):
        d = DataSection(task=task, source="files", train_file=str(path), validation_percent=5)
        check_run_config(RunConfig(data=d, training=TrainingArguments(str(tmp_path), do_train=True, do_eval=True)))
    d = DataSection(task="clm", source="files", train_file=str(path), validation_percent=5)
    texts = file_texts(d, ["train", "eval"])
    theirs = {s: datasets.load_dataset("text", data_files={"train": str(path)}, split=f"train{r}")["text"]
              for s, r in (("eval", "[:5%]"), ("train", "[5%:]"))}
    assert texts == theirs and len(texts["eval"]) == 2 and len(texts["train"]) == 48
    assert file_texts(d, ["eval"]) == {"eval": theirs["eval"]}  # evaluation only: the same rows
    (tmp_path / "short.txt").write_text("one\ntwo\n")
    with pytest.raises(DataError, match=r"5% of its 2 rows is no row to evaluate on"):
        file_texts(DataSection(task="clm", source="files", train_file=str(tmp_path / "short.txt")), ["eval"])


def test_mlm_line_by_line_rows_are_hfs(tmp_path):
    """HF's run_mlm --line_by_line: each non-empty line one row, `tokenizer(line, truncation=True,
    max_length=max_seq_length)` with the template, padded per batch, padding never masked. jtrain refused the
    option. Reference: transformers' tokenizer over the same tokenizer.json."""
    import transformers

    from jtrain.config import DataSection
    from jtrain.data.local_tokenizers import train_tokenizer_for
    from jtrain.data.mlm import build_mlm_data

    lines = [" ".join(CYCLE[: 2 + i % 9]) * (1 + i % 3) for i in range(40)]
    tok = train_tokenizer_for("bert", lines, vocab_size=80)
    d = DataSection(task="mlm", line_by_line=True, max_seq_length=16)
    data = build_mlm_data({"train": lines, "eval": lines[:8]}, lambda _: tok, d, seed=0, length_buckets=[8, 16])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)(lines, truncation=True, max_length=16)
    assert [r.tolist() for r in data.train.rows] == hf["input_ids"]
    assert tok.truncation is None  # the shared tokenizer is left as it was
    assert {len(r) for r in data.train.rows} > {16} and max(len(r) for r in data.train.rows) == 16
    batch = data.collator([data.train[i] for i in range(4)])
    width = max(len(data.train.rows[i]) for i in range(4))
    assert batch["input_ids"].shape == (4, 8 if width <= 8 else 16)  # padded to a length bucket
    pads = batch["attention_mask"] == 0
    assert pads.any() and (batch["labels"][pads] == -100).all()  # padding is never a prediction target
    assert data.splits["eval"].columns["input_ids"].shape[0] == 8


def test_special_tokens_come_from_the_tokenizers_config_as_in_transformers(tmp_path):
    """A tokenizer directory's tokenizer_config.json names its special tokens (Gemma's `<eos>`, a Llama-3 chat
    model's `<|eot_id|>`); transformers reads them there. jtrain guessed from spellings only: a Gemma tokenizer
    had no end-of-sequence token (causal-LM data refused), and a chat model's eos was its base model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jtrain.config import DataSection
    from jtrain.data.local_tokenizers import role_id
    from jtrain.data.text_lm import build_clm_data
    from jtrain.data.tokenizer import load_tokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|end_of_text|>", "<|eot_id|>"]
    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + CYCLE)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    gemma = load_tokenizer(str(tmp_path))  # tokenizer.json alone: Gemma's spellings
    assert (role_id(gemma, "eos"), role_id(gemma, "bos"), role_id(gemma, "pad")) == (4, 2, 0)  # <|end_of_text|> first
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|eot_id|>", "bos_token": {"content": "<bos>", "special": True}, "pad_token": "<pad>"}))
    chat = load_tokenizer(str(tmp_path))
    assert (role_id(chat, "eos"), role_id(chat, "bos"), role_id(chat, "pad")) == (5, 2, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "bos_token": "<bos>"}))
    data = build_clm_data({"train": [" ".join(CYCLE)] * 8}, lambda _: load_tokenizer(str(tmp_path)),
                          DataSection(task="clm", block_size=8))
    assert (np.asarray(data.train.columns["input_ids"]) == 1).any()  # documents end with Gemma's <eos>
