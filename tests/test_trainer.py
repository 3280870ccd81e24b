"""The Trainer's host loop: compile count, callbacks, logging, evaluation, resume."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jtrain import Trainer, TrainerCallback, TrainingArguments
from jtrain.data.loader import ArrayDataset
from jtrain.errors import ConfigError
from jtrain.losses import causal_lm_loss
from tiny import lm_rows, tiny_llama


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=10, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, learning_rate=1e-2, logging_steps=2, save_strategy="no",
                disable_tqdm=True, mesh_shape={"data": 1})
    base.update(kw)
    return TrainingArguments(**base)


def _data(rows=64, length=16, seed=0):
    return ArrayDataset(lm_rows(rows, length, seed))


def test_train_step_compiles_once_and_loss_falls(tmp_path):
    trainer = Trainer(tiny_llama(), _args(tmp_path), train_dataset=_data(), eval_dataset=_data(16, seed=1))
    out = trainer.train()
    assert trainer.steps.compile_log.counts["train"] == 1
    assert out.global_step == 10
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


def test_log_history_has_every_logging_step(tmp_path):
    trainer = Trainer(tiny_llama(), _args(tmp_path, logging_steps=3, logging_first_step=True), train_dataset=_data())
    trainer.train()
    steps = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert steps == [1, 3, 6, 9]


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_callback_stops_training_at_step_7(tmp_path):
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=20), train_dataset=_data(), callbacks=[_StopAt(7)])
    out = trainer.train()
    assert out.global_step == 7 and trainer.state.global_step == 7


def test_eval_dict_gives_prefixed_metrics(tmp_path):
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=2), train_dataset=_data(),
                      eval_dataset={"a": _data(8, seed=2), "b": _data(12, seed=3)})
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_perplexity", "eval_b_runtime"} <= set(metrics)
    assert metrics["eval_a_loss"] != metrics["eval_b_loss"]


def test_compute_loss_override_changes_gradients(tmp_path):
    class Doubled(Trainer):
        def compute_loss(self, outputs, batch):
            out = causal_lm_loss(outputs, batch)
            return out._replace(loss_sum=out.loss_sum * 2.0)

    args = _args(tmp_path, max_steps=1, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant")
    start = jax.tree.map(np.asarray, tiny_llama().init(jax.random.key(0)))
    plain = Trainer(tiny_llama(), args, train_dataset=_data(), params=start)
    doubled = Doubled(tiny_llama(), args, train_dataset=_data(), params=start)
    plain.train()
    doubled.train()
    for p, d, s0 in zip(jax.tree.leaves(plain.params), jax.tree.leaves(doubled.params), jax.tree.leaves(start)):
        # SGD without clipping: the update is linear in the loss, so doubling it doubles the step. The new
        # params are rounded to float32 (norm scales are ~1.0, ulp 1.2e-7), so each side's difference carries
        # up to one ulp and the doubled one two: atol 3e-7 (2.5 ulp at 1.0). Updates are ~1e-5, so a loss
        # override that was ignored (factor 1 instead of 2) fails by two orders of magnitude.
        np.testing.assert_allclose(np.asarray(d) - s0, 2 * (np.asarray(p) - s0), rtol=1e-4, atol=3e-7)


def test_resume_equals_uninterrupted_run(tmp_path):
    data = _data(48)
    full = Trainer(tiny_llama(), _args(tmp_path / "full", max_steps=8), train_dataset=data)
    full.train()
    first = Trainer(tiny_llama(), _args(tmp_path / "part", max_steps=8, save_strategy="steps", save_steps=4),
                    train_dataset=data, callbacks=[_StopAt(5)])
    first.train()
    ckpt = os.path.join(str(tmp_path / "part" / "out"), "checkpoint-4")
    assert os.path.isfile(os.path.join(ckpt, "trainer_state.json"))
    resumed = Trainer(tiny_llama(), _args(tmp_path / "part", max_steps=8, save_strategy="no"), train_dataset=data)
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.state.global_step == 8
    # Same program, same inputs, same device: bitwise equality, no tolerance.
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(os.path.join(ckpt, "loader_state.json")) as fh:
        assert json.load(fh) == {"epoch": 0, "batch_index": 4}


def test_galore_with_8bit_moments_resumes_exactly(tmp_path, monkeypatch):
    """GaLore's state nests an inner optimizer's per-matrix state (here bitsandbytes-style 8-bit moments,
    forced for this tiny model's small projections) beside its projectors; the projector refresh every 3
    updates falls on both sides of the checkpoint. Resumed = uninterrupted, bitwise."""
    import jtrain.optim.low_rank_builders as builders

    monkeypatch.setattr(builders, "_BNB_MIN_8BIT", 0)
    data = _data(48)
    galore = dict(max_steps=8, per_device_train_batch_size=2, optim="galore_adamw_8bit",
                  optim_target_modules="all-linear", optim_args="rank=4,update_proj_gap=3")
    full = Trainer(tiny_llama(), _args(tmp_path / "full", **galore), train_dataset=data)
    full.train()
    first = Trainer(tiny_llama(), _args(tmp_path / "part", save_strategy="steps", save_steps=4, **galore),
                    train_dataset=data, callbacks=[_StopAt(5)])
    first.train()
    resumed = Trainer(tiny_llama(), _args(tmp_path / "part", **galore), train_dataset=data)
    resumed.train(resume_from_checkpoint=os.path.join(str(tmp_path / "part" / "out"), "checkpoint-4"))
    assert resumed.state.global_step == 8
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_num_input_tokens_seen_counts_as_hf_and_survives_a_resume(tmp_path):
    """HF 5's include_num_input_tokens_seen: `all` counts every input token (padding too), `non_padding`
    the attention-mask ones; the count is logged and, kept in TrainerState, continues after a resume."""
    rows = lm_rows(48, 16)
    rows["attention_mask"][:, 12:] = 0  # 4 padding positions per row
    data = ArrayDataset(rows)
    steps, batch = 8, 4
    for mode, per_row in (("all", 16), ("non_padding", 12), (True, 16)):
        trainer = Trainer(tiny_llama(), _args(tmp_path / str(mode), max_steps=steps,
                                              include_num_input_tokens_seen=mode), train_dataset=data)
        trainer.train()
        assert trainer.state.num_input_tokens_seen == steps * batch * per_row, mode
        logged = [e["num_input_tokens_seen"] for e in trainer.state.log_history if "loss" in e]
        assert logged == [2 * i * batch * per_row for i in range(1, steps // 2 + 1)], (mode, logged)
    part = _args(tmp_path / "part", max_steps=steps, save_strategy="steps", save_steps=4,
                 include_num_input_tokens_seen="all")
    Trainer(tiny_llama(), part, train_dataset=data, callbacks=[_StopAt(5)]).train()
    resumed = Trainer(tiny_llama(), part.replace(save_strategy="no"), train_dataset=data)
    resumed.train(resume_from_checkpoint=os.path.join(part.output_dir, "checkpoint-4"))
    assert resumed.state.num_input_tokens_seen == steps * batch * 16
    untracked = Trainer(tiny_llama(), _args(tmp_path / "no", max_steps=2), train_dataset=data)
    untracked.train()
    assert untracked.state.num_input_tokens_seen == 0
    assert all("num_input_tokens_seen" not in e for e in untracked.state.log_history)


def test_ignore_data_skip_restarts_the_data_but_not_the_run(tmp_path):
    """HF's ignore_data_skip: a resumed run reads the data from its first batch again (epoch 0, batch 0)
    while the step, optimizer and schedule continue; without it the loader resumes at the saved batch."""
    data = _data(48)  # 12 updates per epoch at batch 4
    part = _args(tmp_path / "part", max_steps=8, save_strategy="steps", save_steps=4)
    Trainer(tiny_llama(), part, train_dataset=data, callbacks=[_StopAt(5)]).train()
    checkpoint = os.path.join(part.output_dir, "checkpoint-4")
    for skip, first_epoch in ((True, 1 / 12), (False, 5 / 12)):
        seen = []

        class Epochs(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                seen.append((state.global_step, state.epoch))

        resumed = Trainer(tiny_llama(), _args(tmp_path / str(skip), max_steps=8, ignore_data_skip=skip),
                          train_dataset=data, callbacks=[Epochs()])
        resumed.train(resume_from_checkpoint=checkpoint)
        assert seen[0][0] == 5 and seen[0][1] == pytest.approx(first_epoch), (skip, seen[0])
        assert resumed.state.global_step == 8


def test_average_tokens_across_devices_false_is_refused(tmp_path):
    assert _args(tmp_path).average_tokens_across_devices  # HF 5's default, and what the step does
    with pytest.raises(ConfigError, match="average_tokens_across_devices: false"):
        _args(tmp_path, average_tokens_across_devices=False)


def test_predict_and_compute_metrics_see_real_rows_only(tmp_path):
    seen = {}

    def compute_metrics(pred):
        seen["shape"] = pred.predictions.shape
        argmax = pred.predictions[:, :-1].argmax(-1)
        labels = pred.label_ids[:, 1:]
        return {"my_accuracy": float((argmax == labels).mean())}

    eval_data = _data(10, seed=4)  # 10 rows with eval batch 4: the last batch is padded with filler rows
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=3), train_dataset=_data(), eval_dataset=eval_data,
                      compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    assert seen["shape"] == (10, 16, 64)
    # Rows are fully real here, so the host metric equals the device-reduced accuracy (same tokens).
    np.testing.assert_allclose(metrics["eval_my_accuracy"], metrics["eval_accuracy"], rtol=1e-6)
    out = trainer.predict(eval_data)
    assert out.predictions.shape == (10, 16, 64) and out.label_ids.shape == (10, 16)
    assert "test_loss" in out.metrics
    np.testing.assert_allclose(out.metrics["test_loss"], metrics["eval_loss"], rtol=1e-6)


def test_predict_and_evaluate_on_unlabeled_rows_match_hfs_trainer(tmp_path):
    """A test set without labels (inference): HF's Trainer computes no loss, so `predict` returns the
    logits, `label_ids=None` and only the runtime metrics, and `evaluate` reports no eval_loss. jtrain
    did the same except that its step always computed the loss (a KeyError: 'labels'). Same weights
    on both sides: the predictions agree to LOGITS_ATOL (float32 across frameworks)."""
    import datasets
    import transformers
    from test_models_common import LOGITS_ATOL, hf_model

    from jtrain.models import from_pretrained

    torch_model = hf_model("llama", "causal_lm")
    torch_model.save_pretrained(tmp_path / "hf")
    model, params = from_pretrained(tmp_path / "hf")
    ids = lm_rows(6, 12, seed=3, vocab=torch_model.config.vocab_size)["input_ids"]
    hf_args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf_out"), per_device_eval_batch_size=4,
                                             report_to=[], use_cpu=True, disable_tqdm=True)
    hf = transformers.Trainer(torch_model, hf_args).predict(datasets.Dataset.from_dict({"input_ids": ids}))
    unlabeled = [{"input_ids": row} for row in ids]
    trainer = Trainer(model, _args(tmp_path), params=params)
    ours = trainer.predict(unlabeled)
    assert hf.label_ids is None and ours.label_ids is None
    hf_keys = sorted(set(hf.metrics) - {"test_model_preparation_time"})  # torch's model wrapping: none here
    assert sorted(ours.metrics) == hf_keys == ["test_runtime", "test_samples_per_second", "test_steps_per_second"]
    np.testing.assert_allclose(ours.predictions, hf.predictions, atol=LOGITS_ATOL)
    assert "eval_loss" not in trainer.evaluate(unlabeled)
    labeled = trainer.evaluate([{"input_ids": row, "labels": row} for row in ids])  # the same rows, labeled
    assert np.isfinite(labeled["eval_loss"]) and "eval_perplexity" in labeled


def test_predictions_of_batches_padded_to_different_lengths_are_padded_as_hfs(tmp_path):
    """Dynamic padding gives each evaluation batch its own length; HF's loop pads predictions and labels to
    the longest with -100 before concatenating (`nested_concat`). jtrain's concatenate failed with numpy's
    "all the input array dimensions except for the concatenation axis must match". Same weights and the same
    HF collator on both sides: the labels equal HF's, the logits agree to LOGITS_ATOL, padding included."""
    import datasets
    import transformers
    from test_models_common import LOGITS_ATOL, hf_model

    from jtrain.models import from_pretrained

    torch_model = hf_model("llama", "causal_lm")
    torch_model.save_pretrained(tmp_path / "hf")
    model, params = from_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 60, size=n).tolist() for n in (5, 9, 4, 12, 7, 3)]  # batches of 2: 9, 12 and 7 long
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer(
        __import__("tokenizers").models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")), pad_token="<pad>")
    collator = transformers.DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    hf_args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf_out"), per_device_eval_batch_size=2,
                                             report_to=[], use_cpu=True, disable_tqdm=True)
    hf = transformers.Trainer(torch_model, hf_args, data_collator=collator).predict(dataset)
    ours = Trainer(model, _args(tmp_path, per_device_eval_batch_size=2), params=params,
                   data_collator=collator).predict(dataset)
    assert ours.predictions.shape == hf.predictions.shape == (6, 12, torch_model.config.vocab_size)
    np.testing.assert_array_equal(ours.label_ids, hf.label_ids)
    np.testing.assert_allclose(ours.predictions, hf.predictions, atol=LOGITS_ATOL)
    assert ours.metrics["test_loss"] == pytest.approx(hf.metrics["test_loss"], rel=1e-5)


def test_evaluate_and_train_metrics_carry_the_epoch_as_hfs(tmp_path):
    """HF's `log` writes the epoch into the metrics dict it is given, so what evaluate() and train() return
    (and train_results.json / all_results.json) hold `epoch`; jtrain's logged a copy and returned none.
    Checked against HF's own Trainer on the same tiny run: the same epoch at each point."""
    import warnings

    import torch
    import transformers

    rows = lm_rows(8, 8, vocab=64)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": torch.from_numpy(rows["input_ids"][i]).long(),
                    "labels": torch.from_numpy(rows["labels"][i]).long()}

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_args = transformers.TrainingArguments(str(tmp_path / "hf"), use_cpu=True, report_to="none", max_steps=3,
                                                 per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
    hf = transformers.Trainer(transformers.LlamaForCausalLM(cfg), hf_args, train_dataset=Rows(), eval_dataset=Rows())
    ours = Trainer(tiny_llama(), _args(tmp_path, max_steps=3), train_dataset=ArrayDataset(rows),
                   eval_dataset=ArrayDataset(rows))
    for trainer in (hf, ours):
        before, trained, after = trainer.evaluate(), trainer.train().metrics, trainer.evaluate()
        assert (before["epoch"], trained["epoch"], after["epoch"]) == (0, 1.5, 1.5)  # 3 updates of 2 per epoch


def test_logged_learning_rates_are_hfs_python_floats(tmp_path):
    """HF's Trainer logs the rate of each update as the Python float its LambdaLR holds (3.75e-05); jtrain
    logged the compiled step's float32 (3.7499998e-05). Checked against HF's scheduler on the same
    arguments (HF 5 logs the rate the logged update used): equal to the last bit."""
    import torch
    from transformers import get_scheduler

    args = _args(tmp_path, max_steps=6, logging_steps=1, learning_rate=3e-4, warmup_steps=2,
                 lr_scheduler_type="cosine")
    trainer = Trainer(tiny_llama(), args, train_dataset=_data(48))
    trainer.train()
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert logged == expected
    assert trainer.get_learning_rates() == [opt.param_groups[0]["lr"]]  # the next update's: 0 at the end


def test_training_rows_without_labels_are_refused_before_compiling(tmp_path):
    """The built-in loss needs `labels`: a training set without them fails when train() starts, with
    the columns it has and how to get labels, not with a KeyError from inside the traced loss; a
    user's loss (compute_loss_func) that reads other columns is left to decide."""
    from jtrain.errors import DataError

    rows = [{"input_ids": row} for row in lm_rows(8, 16)["input_ids"]]
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=2), train_dataset=rows)
    with pytest.raises(DataError, match=r"no 'labels' \(they have \['input_ids'\]\).*causal_lm loss.*"
                                        r"DataCollatorForLanguageModeling\(tokenizer, mlm=False\)"):
        trainer.train()
    assert trainer.steps is None and trainer.state.global_step == 0

    def on_input_ids(outputs, batch):  # jtrain's signature: a loss that makes its own targets
        return causal_lm_loss(outputs, {"labels": batch["input_ids"]})

    result = Trainer(tiny_llama(), _args(tmp_path, max_steps=2), train_dataset=rows,
                     compute_loss_func=on_input_ids).train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)


def test_a_metric_for_best_model_that_evaluation_never_reports_is_an_error(tmp_path):
    """As HF: metric_for_best_model names a metric the evaluation must report. jtrain skipped a missing
    one silently, so load_best_model_at_end kept the last weights and save_total_limit could delete
    the best checkpoint. The error names the metrics there are; checkpoints already written stay."""
    args = _args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=1,
                 metric_for_best_model="f1")
    trainer = Trainer(tiny_llama(), args, train_dataset=_data(), eval_dataset=_data(8, seed=1))
    with pytest.raises(ConfigError, match=r"metric_for_best_model is 'f1', but the evaluation reported no 'eval_f1' "
                                          r"\(it reported \['eval_accuracy', 'eval_loss', 'eval_perplexity'\]\)"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["checkpoint-1"]  # the update before the first evaluation
    assert "trainer_state.json" in os.listdir(out / "checkpoint-1")


def test_evaluate_before_train_leaves_the_run_as_it_would_be(tmp_path):
    """A baseline evaluate() (or save_model()) before train() is common with HF's Trainer. It set up
    jtrain's state without the training loader, so under num_train_epochs the schedule was built for
    one update and the learning rate fell to 0 after the first. train() now keeps the parameters and
    rebuilds the rest: every logged learning rate and loss and the final parameters equal those of a
    run without the evaluation (exactly: same programs, same data order, same seed)."""
    args = _args(tmp_path, max_steps=-1, num_train_epochs=2, logging_steps=1)

    def run(before: str | None) -> tuple[list, list, list]:
        trainer = Trainer(tiny_llama(), args, train_dataset=_data(16), eval_dataset=_data(8, seed=1))
        if before == "evaluate":
            assert np.isfinite(trainer.evaluate()["eval_loss"])
        elif before == "save_model":
            trainer.save_model(str(tmp_path / "initial"))
        trainer.train()
        logs = [h for h in trainer.state.log_history if "learning_rate" in h]
        return ([h["learning_rate"] for h in logs], [h["loss"] for h in logs],
                [np.asarray(x) for x in jax.tree.leaves(trainer.params)])

    plain = run(None)
    assert len(plain[0]) == 8 and plain[0][-1] > 0  # 2 epochs of 4 updates, linear decay not yet at 0
    for before in ("evaluate", "save_model"):
        lrs, losses, params = run(before)
        assert lrs == plain[0] and losses == plain[1], before
        for got, want in zip(params, plain[2]):
            np.testing.assert_array_equal(got, want)


def test_evaluations_without_an_eval_dataset_are_refused_at_construction(tmp_path):
    """As HF's Trainer: eval_strategy other than 'no' without an eval_dataset is refused when the
    Trainer is built, not after the first eval_steps updates of training."""
    with pytest.raises(ConfigError, match="eval_strategy is 'steps' but the Trainer got no eval_dataset"):
        Trainer(tiny_llama(), _args(tmp_path, eval_strategy="steps", eval_steps=2), train_dataset=_data(16))
    Trainer(tiny_llama(), _args(tmp_path, eval_strategy="steps", eval_steps=2), train_dataset=_data(16),
            eval_dataset=_data(8))


def test_save_model_before_train_writes_the_initial_weights(tmp_path):
    """As HF's: save_model() on a Trainer that has not trained writes the weights it holds (here
    `params=`), in HF format; they load back unchanged."""
    from jtrain.models import from_pretrained

    model = tiny_llama()
    params = model.init(jax.random.key(7))
    directory = Trainer(model, _args(tmp_path), params=params).save_model(str(tmp_path / "initial"))
    _, loaded = from_pretrained(directory)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("problem", ["regression", "multi_label", "multi_output_regression"])
def test_float_label_heads_evaluate_the_same_whatever_the_batch_padding(tmp_path, problem):
    """Regression and multi-label heads take float labels. The loader pads a short batch with filler
    rows whose labels were -100, a target like any other for a float loss: evaluating 10 rows in
    batches of 4 gave a loss of ~1,700 against 1.6 in one batch of 10 (training pulled towards -100
    too). Filler rows now carry NaN float labels, left out of the loss: both batchings agree to
    float32 rounding of the sums (1e-6 relative), and the mean equals the loss of the predictions;
    no accuracy is reported for these heads (HF reports none). A config's problem_type reaches the
    loss: three outputs with problem_type regression are an MSE over every entry, as in HF."""
    from jtrain.models import create_model

    classes = 1 if problem == "regression" else 3
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_labels=classes)
    if problem == "multi_output_regression":
        config["problem_type"] = "regression"
    model = create_model("llama", config, task="sequence_classification")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(10, 8)).astype(np.int32)
    labels = rng.integers(0, 2, size=(10, classes)) if problem == "multi_label" else rng.normal(size=(10, classes))
    rows = [{"input_ids": ids[i], "labels": labels[i].astype(np.float32).reshape(-1 if classes > 1 else ())}
            for i in range(10)]
    params = model.init(jax.random.key(0))
    results = {}
    for batch in (10, 4):
        trainer = Trainer(model, _args(tmp_path, per_device_eval_batch_size=batch), params=params)
        results[batch] = trainer.evaluate(rows)
    np.testing.assert_allclose(results[4]["eval_loss"], results[10]["eval_loss"], rtol=1e-6)
    assert "eval_accuracy" not in results[4]
    logits = trainer.predict(rows).predictions.astype(np.float64)
    if problem != "multi_label":
        want = np.mean((logits - labels) ** 2)
    else:
        want = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
    np.testing.assert_allclose(results[4]["eval_loss"], want, rtol=1e-5)  # float32 model vs float64 formula


def test_include_for_metrics_passes_inputs_and_losses(tmp_path):
    seen = {}

    def compute_metrics(pred):
        seen["inputs"], seen["losses"] = pred.inputs, pred.losses
        return {}

    eval_data = _data(8, seed=5)
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=1, include_for_metrics=["inputs", "loss"]),
                      train_dataset=_data(), eval_dataset=eval_data, compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    np.testing.assert_array_equal(seen["inputs"], eval_data.columns["input_ids"])
    # As HF: each batch's mean loss, repeated for each of its rows (two eval batches of 4 rows).
    assert seen["losses"].shape == (8,)
    np.testing.assert_array_equal(seen["losses"][:4], seen["losses"][0])
    # Equal-weight batches: the mean of batch means is the eval loss (float32 sums: rtol 1e-6).
    np.testing.assert_allclose(seen["losses"].mean(), metrics["eval_loss"], rtol=1e-6)


def _token_hits(pred):
    """Next-token hits and counts of one EvalPrediction (the metric both evaluation modes compute)."""
    argmax, labels = pred.predictions[:, :-1].argmax(-1), pred.label_ids[:, 1:]
    return int((argmax == labels).sum()), labels.size


def test_batch_eval_metrics_accumulates_per_batch_like_one_call(tmp_path):
    """HF's `batch_eval_metrics`: compute_metrics after every batch, `compute_result` true on the last,
    whose result is the metric; it equals the one-call metric over all predictions (exact counts)."""
    calls, sums = [], [0, 0]

    def per_batch(pred, compute_result):
        hits, count = _token_hits(pred)
        sums[0], sums[1] = sums[0] + hits, sums[1] + count
        calls.append((pred.predictions.shape[0], compute_result))
        return {"hit_rate": sums[0] / sums[1]} if compute_result else {}

    def whole(pred):
        hits, count = _token_hits(pred)
        return {"hit_rate": hits / count}

    eval_data, train_data = _data(10, seed=4), _data()  # batches of 4, 4 and 2 real rows
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=2), train_dataset=train_data, eval_dataset=eval_data,
                      compute_metrics=whole)
    trainer.train()
    expected = trainer.evaluate()["eval_hit_rate"]
    trainer.args = trainer.args.replace(batch_eval_metrics=True)
    trainer.compute_metrics = per_batch
    assert trainer.evaluate()["eval_hit_rate"] == expected
    assert calls == [(4, False), (4, False), (2, True)]
    out = trainer.predict(eval_data)  # predict() still returns every prediction, as HF
    assert out.predictions.shape == (10, 16, 64) and out.metrics["test_hit_rate"] == expected


def test_batch_eval_metrics_needs_compute_result(tmp_path):
    with pytest.raises(ConfigError, match="compute_result"):
        Trainer(tiny_llama(), _args(tmp_path, batch_eval_metrics=True), train_dataset=_data(),
                compute_metrics=lambda pred: {})


def test_eval_do_concat_batches_false_keeps_one_array_per_batch(tmp_path):
    eval_data = _data(10, seed=4)
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=1, include_for_metrics=["inputs", "loss"]),
                      train_dataset=_data())
    trainer.train()
    joined = trainer.predict(eval_data)
    trainer.args = trainer.args.replace(eval_do_concat_batches=False)
    split = trainer.predict(eval_data)
    assert [p.shape[0] for p in split.predictions] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(split.predictions), joined.predictions)
    np.testing.assert_array_equal(np.concatenate(split.label_ids), joined.label_ids)


def test_use_cpu_and_full_determinism_are_set_before_jax_starts(monkeypatch):
    """Before the backend exists: `use_cpu` selects JAX's CPU platform, `full_determinism` adds
    XLA:GPU's determinism flag (kept beside the user's own flags)."""
    import jtrain.xla_flags as xf

    updates = []
    monkeypatch.setattr(xf, "backend_started", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    xf.apply_backend_choices(use_cpu=True, full_determinism=True)  # on the CPU no flag is needed
    assert updates == [("jax_platforms", "cpu")]
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=3"
    xf.apply_backend_choices(use_cpu=False, full_determinism=True)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=3", xf.DETERMINISTIC_FLAG]


@pytest.mark.cpu_only("use_cpu after JAX started holds only where it started on the CPU")
def test_use_cpu_and_full_determinism_after_jax_started(tmp_path, monkeypatch):
    """Once JAX runs, a choice that already holds (the CPU here) is accepted; on a GPU backend
    both are refused with the way to get them."""
    from jtrain.xla_flags import apply_backend_choices

    jax.devices()
    Trainer(tiny_llama(), _args(tmp_path, use_cpu=True, full_determinism=True), train_dataset=_data())
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ConfigError, match="JAX_PLATFORMS=cpu"):
        apply_backend_choices(use_cpu=True, full_determinism=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(ConfigError, match="xla_gpu_deterministic_ops"):
        apply_backend_choices(use_cpu=False, full_determinism=True)


def test_dataloader_getters_are_what_train_and_evaluate_iterate(tmp_path):
    """HF's get_*_dataloader: iterable batches for inspection, and override points that
    train/evaluate/predict go through; a loader jtrain cannot place is refused by name."""
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
                      train_dataset=_data(), eval_dataset=_data(10, seed=1))
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape == (2, 4, 16)  # [accumulation, per-device rows (4 x 1 device), length]
    assert len(trainer.get_eval_dataloader()) == 3 and len(trainer.get_test_dataloader(_data(8))) == 2
    other = _data(12, seed=7)

    class OnOther(Trainer):
        def get_eval_dataloader(self, eval_dataset=None):
            return super().get_eval_dataloader(other)

    trainer.train()
    custom = OnOther(trainer.model, trainer.args, train_dataset=_data(), eval_dataset=_data(10, seed=1),
                     params=trainer.params)
    assert custom.evaluate()["eval_loss"] == trainer.evaluate(other)["eval_loss"]

    class Wrong(Trainer):
        def get_test_dataloader(self, test_dataset):
            return list(super().get_test_dataloader(test_dataset))

    with pytest.raises(ConfigError, match=r"get_test_dataloader\(\) returned a list"):
        Wrong(trainer.model, trainer.args, params=trainer.params).predict(other)


_SECOND_RUN_LOSS_RTOL = 2e-5  # float32 both sides, reassociated sums; the measured gaps are in each test


def _two_runs_beside_hfs(tmp_path, **options) -> tuple[dict, Trainer, dict]:
    """The losses of two train() calls of three updates each, HF's Trainer and jtrain's from the same
    weights, the four rows one batch (so the sampler's order cannot matter), AdamW-style arguments
    with clipping and a linear schedule unless `options` say otherwise. Returns the losses per side,
    jtrain's Trainer and the arguments shared by both."""
    import datasets
    import transformers
    from test_models_common import hf_model

    from jtrain.models import from_pretrained

    torch_model = hf_model("llama", "causal_lm")
    torch_model.save_pretrained(tmp_path / "hf")
    model, params = from_pretrained(tmp_path / "hf")
    ids = lm_rows(4, 12, seed=5, vocab=torch_model.config.vocab_size)["input_ids"]
    rows = {"input_ids": ids, "labels": ids}
    common = {**dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.01,
                     max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
                     disable_tqdm=True), **options}
    hf = transformers.Trainer(torch_model.train(), transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf_out"), use_cpu=True, **common), train_dataset=datasets.Dataset.from_dict(rows))
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path / "out"), mesh_shape={"data": 1}, **common),
                      train_dataset=ArrayDataset(rows), params=params)
    losses = {}
    for name, side in (("hf", hf), ("jtrain", trainer)):
        side.train()
        first = [h["loss"] for h in side.state.log_history if "loss" in h]
        side.train()
        losses[name] = first + [h["loss"] for h in side.state.log_history if "loss" in h]
    assert len(losses["hf"]) == len(losses["jtrain"]) == 6
    return losses, trainer, common


def test_a_second_train_keeps_the_optimizers_moments_and_restarts_the_schedule_as_hfs(tmp_path):
    """HF's second train() keeps its torch optimizer (Adam's moments and step count) and builds a new
    scheduler; jtrain's started the optimizer state fresh, so from the second update of the second run
    on its losses left HF's. The six losses agree to the tolerance, while a fresh optimizer state
    moves the second run's later losses by more than 10x that.

    AdamW's normalised updates let the difference grow from 1.5e-7 at the first loss to 7.7e-6 at the
    sixth (measured). The old fresh state was 23% off at the fifth."""
    losses, trainer, common = _two_runs_beside_hfs(tmp_path)
    np.testing.assert_allclose(losses["jtrain"], losses["hf"], rtol=_SECOND_RUN_LOSS_RTOL)
    trained = jax.tree.map(np.asarray, trainer.params)
    fresh = Trainer(trainer.model, TrainingArguments(output_dir=str(tmp_path / "fresh"), mesh_shape={"data": 1},
                                                     **common), train_dataset=trainer.train_dataset, params=trained)
    fresh.train()  # what the second run was before: the weights carried, the optimizer state not
    fresh_losses = [h["loss"] for h in fresh.state.log_history if "loss" in h]
    assert np.abs(np.array(fresh_losses[1:]) / np.array(losses["hf"][4:]) - 1).max() > 10 * _SECOND_RUN_LOSS_RTOL


def test_a_second_schedule_free_train_keeps_the_averaging_and_restarts_only_hfs_scheduler(tmp_path):
    """HF's second train() keeps schedulefree's optimizer, whose own step count goes on (its warm-up
    ramp does not start again, nor its bias correction or averaging weights), while HF's new
    scheduler restarts the linear decay. schedule_free_adamw with a three-update warm-up (HF hands
    its `warmup_steps` to both its scheduler and schedulefree, so the second run's second update is
    where a restarted ramp shows): the six losses agree to the tolerance (measured 1.0e-6 at most).
    jtrain used to read the ramp at the restarted schedule count and the averaging weights' rate at
    the continuing one: its sixth loss was 3.0% off."""
    losses, _, _ = _two_runs_beside_hfs(tmp_path, optim="schedule_free_adamw", warmup_steps=3,
                                        lr_scheduler_type="linear")
    np.testing.assert_allclose(losses["jtrain"], losses["hf"], rtol=_SECOND_RUN_LOSS_RTOL)
