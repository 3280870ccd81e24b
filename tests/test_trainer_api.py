"""HF Trainer API beyond train/evaluate/predict: HF's constructor order, model_init,
optimizer_cls_and_kwargs, floating_point_ops / total_flos, hyperparameter_search (optuna) and
create_model_card, each against HF's own function or an invariance.

Tolerances: parameters after training with the same AdamW built two ways are compared at
1e-6 abs (float32, identical arithmetic order up to the optax chain's grouping); everything
else is exact (integer FLOP counts, parsed files, untouched parameters).
"""

from __future__ import annotations

import inspect
import json
import types

import jax
import numpy as np
import optax
import optuna
import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from test_models_common import hf_model, padded_batch
from tiny import lm_rows, tiny_llama
from transformers.modelcard import make_markdown_table, parse_log_history
from transformers.trainer_utils import default_compute_objective as hf_default_compute_objective

from jtrain import Trainer, TrainerCallback, TrainingArguments
from jtrain.data.loader import ArrayDataset
from jtrain.errors import ConfigError
from jtrain.hp_search import default_compute_objective
from jtrain.models import from_pretrained

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _args(tmp_path, **kw):
    return TrainingArguments(**{"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                                "learning_rate": 1e-2, "save_strategy": "no", "disable_tqdm": True,
                                "mesh_shape": {"data": 1}, "report_to": [], **kw})


def _train_data():
    return ArrayDataset(lm_rows(32, 16))


def _eval_data():
    return ArrayDataset(lm_rows(8, 16, seed=1))


# ---- constructor -----------------------------------------------------------------------------
def test_constructor_takes_hf_arguments_in_hf_order():
    ours = list(inspect.signature(Trainer.__init__).parameters)[1:]
    theirs = list(inspect.signature(transformers.Trainer.__init__).parameters)[1:]
    assert ours[:len(theirs)] == theirs  # positional calls written for HF mean the same here
    assert [p.kind for p in inspect.signature(Trainer.__init__).parameters.values()][-2:] == [
        inspect.Parameter.KEYWORD_ONLY] * 2  # jtrain's own: params, mesh


def test_model_init_with_and_without_trial_and_with_params(tmp_path):
    calls = []

    def init_with_trial(trial):
        calls.append(trial)
        return tiny_llama()

    trainer = Trainer(model_init=init_with_trial, args=_args(tmp_path))
    assert calls == [None] and trainer.model.task == "causal_lm"  # HF calls model_init(None) at construction
    params = jax.tree.map(np.zeros_like, tiny_llama().init(jax.random.key(0)))
    trainer = Trainer(model_init=lambda: (tiny_llama(), params), args=_args(tmp_path))
    out = trainer.predict(_eval_data())  # the params model_init returned, not fresh ones: all-zero weights
    np.testing.assert_array_equal(out.predictions, np.zeros_like(out.predictions))
    with pytest.raises(ConfigError, match="model_init returned a str"):
        Trainer(model_init=lambda: "llama", args=_args(tmp_path))
    with pytest.raises(ConfigError, match="no argument or one"):
        Trainer(model_init=lambda a, b: tiny_llama(), args=_args(tmp_path))
    with pytest.raises(ConfigError, match="needs a `model`"):
        Trainer(args=_args(tmp_path))


def test_a_model_that_is_not_a_jtrain_model_is_refused_with_the_way_to_get_one(tmp_path):
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ConfigError, match="PyTorch model .*LlamaForCausalLM.*jtrain.models.from_pretrained"):
        Trainer(torch_model, _args(tmp_path))
    with pytest.raises(ConfigError, match="must be a jtrain Model, got builtins.str.*create_model"):
        Trainer("llama", _args(tmp_path))


def test_hfs_attributes_without_a_counterpart_say_why(tmp_path):
    """Ported code reads trainer.accelerator or calls trainer.push_to_hub(): each is an error that names the
    attribute and jtrain's way (Python's bare "has no attribute" before), hasattr() stays False, and the
    table names only HF's Trainer attributes."""
    from jtrain.trainer_checks import HF_ONLY_ATTRIBUTES

    trainer = Trainer(tiny_llama(), TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    hf_instance_attributes = {"accelerator", "model_wrapped", "place_model_on_device", "is_deepspeed_enabled",
                              "is_fsdp_enabled"}  # set in HF's __init__, not on its class
    for name in HF_ONLY_ATTRIBUTES:
        assert hasattr(transformers.Trainer, name) or name in hf_instance_attributes, name
        assert not hasattr(trainer, name), name
        with pytest.raises(AttributeError, match=f"Trainer.{name} is part of HF's torch Trainer"):
            getattr(trainer, name)
    with pytest.raises(AttributeError, match="'Trainer' object has no attribute 'no_such_thing'"):
        trainer.no_such_thing  # noqa: B018
    with pytest.raises(ConfigError, match="Trainer.push_to_hub: jtrain never uploads; upload `output_dir`"):
        trainer.push_to_hub(commit_message="done")


def test_a_subclass_written_for_hfs_trainer_is_refused_with_the_fix(tmp_path):
    """A Trainer subclass ported from HF: an override jtrain never calls would train as if it were not
    there, and HF's torch signature of compute_loss / prediction_step would fail inside the traced
    step ('dict' object is not callable). Both are refused at construction, naming the method and
    jtrain's way; overrides with jtrain's signatures stay accepted."""
    from jtrain.trainer_checks import _HF_SIGNATURES, HF_ONLY_METHODS

    for name in HF_ONLY_METHODS:  # every name is a method of HF's Trainer and none is jtrain's
        assert hasattr(transformers.Trainer, name) and not hasattr(Trainer, name), name
    for name, (_, hf_only, _) in _HF_SIGNATURES.items():  # HF's own signature is the one caught
        assert hf_only <= set(inspect.signature(getattr(transformers.Trainer, name)).parameters), name

    class HFLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

    class HFPrediction(Trainer):
        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            return None, None, None

    class HFLoop(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            raise AssertionError("never called")

        def _save(self, output_dir=None, state_dict=None):
            raise AssertionError("never called")

    class JtrainStyle(Trainer):
        def compute_loss(self, outputs, batch):
            return super().compute_loss(outputs, batch)

        def prediction_step(self, outputs, batch):
            return outputs["logits"].argmax(-1)

    args = _args(tmp_path)
    with pytest.raises(ConfigError, match=r"HFLoss.compute_loss has HF's torch signature.*compute_loss\(self, "
                                          r"outputs, batch\) -> jtrain.losses.LossOutput.*compute_loss_func"):
        HFLoss(tiny_llama(), args, train_dataset=_train_data())
    with pytest.raises(ConfigError, match=r"HFPrediction.prediction_step has HF's torch signature.*"
                                          r"prediction_step\(self, outputs, batch\)"):
        HFPrediction(tiny_llama(), args)
    with pytest.raises(ConfigError, match=r"HFLoop overrides training_step, _save, which jtrain's Trainer never "
                                          r"calls.*training_step: .*compute_loss.*_save: override save_model"):
        HFLoop(tiny_llama(), args)
    result = JtrainStyle(tiny_llama(), args, train_dataset=_train_data()).train()
    assert np.isfinite(result.training_loss)


def test_a_torch_optimizer_or_scheduler_is_refused_with_the_optax_way(tmp_path):
    """`optimizers=(torch optimizer, torch scheduler)`, as written for HF, fails at construction
    rather than at the first step inside jtrain.state or optax; a subclass whose create_optimizer
    builds a torch optimizer fails when train() builds it, before anything compiles."""
    weight = torch.nn.Parameter(torch.zeros(2))
    torch_opt = torch.optim.AdamW([weight])
    with pytest.raises(ConfigError, match="optimizers: the optimizer is a torch.optim.adamw.AdamW, not an optax "
                                          "GradientTransformation.*optimizer_cls_and_kwargs"):
        Trainer(tiny_llama(), _args(tmp_path), optimizers=(torch_opt, None))
    sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda step: 1.0)
    with pytest.raises(ConfigError, match="the learning-rate schedule is a torch.optim.lr_scheduler.LambdaLR.*"
                                          "lr_scheduler_type"):
        Trainer(tiny_llama(), _args(tmp_path), optimizers=(optax.adamw(1e-3), sched))

    class TorchOptimizer(Trainer):
        def create_optimizer(self):
            self.optimizer = torch_opt
            return self.optimizer

    trainer = TorchOptimizer(tiny_llama(), _args(tmp_path), train_dataset=_train_data())
    with pytest.raises(ConfigError, match="create_optimizer_and_scheduler: the optimizer is a torch"):
        trainer.train()
    assert trainer.steps is None  # nothing half-built stays behind
    # optax's own pair is accepted
    Trainer(tiny_llama(), _args(tmp_path), optimizers=(optax.adamw(1e-3), optax.constant_schedule(1e-3)))


def test_optimizer_cls_and_kwargs_equals_the_named_optimizer(tmp_path):
    """(optax.adamw, kwargs) with HF's weight decay and mask must train exactly like optim=adamw_torch."""
    common = dict(weight_decay=0.1, max_grad_norm=0.5, warmup_steps=1)
    named = Trainer(tiny_llama(), _args(tmp_path / "a", **common), train_dataset=_train_data())
    named.train()
    factory = Trainer(tiny_llama(), _args(tmp_path / "b", **common), train_dataset=_train_data(),
                      optimizer_cls_and_kwargs=(optax.adamw, {"b1": 0.9, "b2": 0.999, "eps": 1e-8}))
    factory.train()
    for a, b in zip(jax.tree.leaves(named.params), jax.tree.leaves(factory.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ConfigError, match="drop 'learning_rate'"):
        Trainer(tiny_llama(), _args(tmp_path), train_dataset=_train_data(),
                optimizer_cls_and_kwargs=(optax.adamw, {"learning_rate": 1e-3})).train()
    with pytest.raises(ConfigError, match="takes no `learning_rate`"):
        Trainer(tiny_llama(), _args(tmp_path), train_dataset=_train_data(),
                optimizer_cls_and_kwargs=(optax.clip, {"max_delta": 1.0})).train()


# ---- FLOPs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,task", [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "masked_lm")])
def test_floating_point_ops_match_hf(model_type, task, tmp_path):
    hf = hf_model(model_type, task)
    hf.save_pretrained(tmp_path)
    model, params = from_pretrained(tmp_path)
    batch = padded_batch(model_type, rows=3, length=10)
    ours = Trainer(model, _args(tmp_path), params=params).floating_point_ops(batch)
    theirs = transformers.Trainer.floating_point_ops(types.SimpleNamespace(model=hf),  # HF's own method
                                                     {"input_ids": torch.as_tensor(batch["input_ids"])})
    assert ours == theirs > 0


def test_total_flos_is_summed_in_trainer_state_and_continues_on_resume(tmp_path):
    args = _args(tmp_path, save_strategy="steps", save_steps=2)
    whole = Trainer(tiny_llama(), args, train_dataset=_train_data())
    metrics = whole.train().metrics
    per_update = whole.floating_point_ops(lm_rows(4, 16))  # HF adds this per batch of 4 rows x 16 tokens
    assert whole.state.total_flos == metrics["total_flos"] == 4 * per_update
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["total_flos"] == 2 * per_update
    resumed = Trainer(tiny_llama(), args.replace(save_strategy="no"), train_dataset=_train_data())
    metrics = resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")).metrics
    assert metrics["total_flos"] == resumed.state.total_flos == 4 * per_update


# ---- hyperparameter search -------------------------------------------------------------------
def test_default_objective_is_hfs():
    for metrics in ({"eval_loss": 1.5, "epoch": 2.0, "eval_runtime": 3.0, "eval_samples_per_second": 9.0},
                    {"eval_loss": 1.5, "eval_f1": 0.25, "eval_accuracy": 0.5, "eval_steps_per_second": 2.0}):
        assert default_compute_objective(metrics) == hf_default_compute_objective(metrics)


class _Ends(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_train_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class _PruneLearningRate(optuna.pruners.BasePruner):
    """Prunes the trial of one learning rate at its first report (the grid's order is random)."""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    def prune(self, study, trial):
        return trial.params["learning_rate"] == self.learning_rate


def test_hyperparameter_search_applies_values_reports_and_prunes(tmp_path):
    ends, seen = _Ends(), []

    def model_init(trial):
        seen.append(None if trial is None else trial.params.get("learning_rate"))
        return tiny_llama()

    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=_train_data(), eval_dataset=_eval_data(),
                      callbacks=[ends])
    untrained = Trainer(tiny_llama(), args, eval_dataset=_eval_data()).evaluate()["eval_loss"]
    grid = {"learning_rate": [0.0, 1e-2, 3e-2]}
    best = trainer.hyperparameter_search(
        hp_space=lambda t: {"learning_rate": t.suggest_categorical("learning_rate", grid["learning_rate"])},
        n_trials=3, direction="minimize", sampler=optuna.samplers.GridSampler(grid, seed=0),
        pruner=_PruneLearningRate(3e-2))
    learning_rates = {}
    for number in range(3):
        state = json.loads((tmp_path / "out" / f"run-{number}" / "checkpoint-2" / "trainer_state.json").read_text())
        assert state["trial_params"]["learning_rate"] == seen[number + 1]  # model_init(trial) saw the same trial
        assert state["is_hyper_param_search"] is True
        learning_rates[state["trial_params"]["learning_rate"]] = number
    pruned, zero = learning_rates[3e-2], learning_rates[0.0]
    # The pruned trial's training ended at its first evaluation (step 2 of 4): on_train_end, no later checkpoint.
    assert ends.steps == [2 if n == pruned else 4 for n in range(3)]
    assert not (tmp_path / "out" / f"run-{pruned}" / "checkpoint-4").exists()

    def last_eval_loss(number: int) -> float:
        path = tmp_path / "out" / f"run-{number}" / "checkpoint-4" / "trainer_state.json"
        return [e for e in json.loads(path.read_text())["log_history"] if "eval_loss" in e][-1]["eval_loss"]

    assert last_eval_loss(zero) == pytest.approx(untrained, rel=1e-6)  # lr 0: the weights never moved
    assert best.run_id == str(learning_rates[1e-2]) and best.hyperparameters == {"learning_rate": 1e-2}
    # The objective is HF's default, eval_loss alone (jtrain's extra accuracy and perplexity left out).
    assert best.objective == last_eval_loss(int(best.run_id)) < untrained


class _PruneAll(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_a_search_whose_every_trial_is_pruned_says_so(tmp_path):
    from jtrain.errors import JtrainError

    trainer = Trainer(model_init=tiny_llama, args=_args(tmp_path, eval_strategy="steps", eval_steps=2),
                      train_dataset=_train_data(), eval_dataset=_eval_data())
    with pytest.raises(JtrainError, match="none of the 1 trials completed .they were pruned."):
        trainer.hyperparameter_search(hp_space=lambda t: {"seed": t.suggest_int("seed", 1, 2)}, n_trials=1,
                                      pruner=_PruneAll())


def test_hyperparameter_search_refuses_what_it_cannot_do(tmp_path):
    with_init = dict(model_init=tiny_llama, args=_args(tmp_path), train_dataset=_train_data())
    with pytest.raises(ConfigError, match="pass model_init"):
        Trainer(tiny_llama(), _args(tmp_path), train_dataset=_train_data(),
                eval_dataset=_eval_data()).hyperparameter_search(n_trials=1)
    with pytest.raises(ConfigError, match="eval_dataset"):
        Trainer(**with_init).hyperparameter_search(n_trials=1)
    trainer = Trainer(**with_init, eval_dataset=_eval_data())
    with pytest.raises(ConfigError, match="'ray' is not supported"):
        trainer.hyperparameter_search(backend="ray")
    with pytest.raises(ConfigError, match=r"unknown keyword arguments \['n_startup'\]"):
        trainer.hyperparameter_search(n_startup=3)
    with pytest.raises(ConfigError, match="n_jobs must be 1"):
        trainer.hyperparameter_search(n_jobs=2)


# ---- model card ------------------------------------------------------------------------------
def test_model_card_matches_hfs_layout_and_parses(tmp_path):
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, logging_steps=1, gradient_accumulation_steps=2,
                 per_device_train_batch_size=2)
    trainer = Trainer(tiny_llama(), args, train_dataset=_train_data(), eval_dataset=_eval_data())
    trainer.train()
    final = trainer.evaluate()
    trainer.create_model_card(license="apache-2.0", dataset_tags="wikitext", dataset="WikiText",
                              dataset_args="wikitext-2-raw-v1", tags="tiny")
    text = (tmp_path / "out" / "README.md").read_text()
    _, lines, results = parse_log_history(trainer.state.log_history)
    assert make_markdown_table(lines) in text  # the training-results table HF would write
    assert f"- Loss: {final['eval_loss']:.4f}" in text and "- gradient_accumulation_steps: 2" in text
    assert "- total_train_batch_size: 4" in text and "- training_steps: 4" in text
    card = ModelCard.load(str(tmp_path / "out" / "README.md"))  # the Hub's own parser
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.tags == ["tiny", "generated_from_trainer", "jtrain"]
    (result,) = card.data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_args) == ("text-generation", "wikitext",
                                                                            "wikitext-2-raw-v1")
    assert result.metric_type == "accuracy" and result.metric_value == final["eval_accuracy"] == results["Accuracy"]


# ---- train / evaluate / predict arguments ----------------------------------------------------
def test_train_evaluate_predict_take_hfs_arguments(tmp_path):
    for name in ("train", "evaluate", "predict", "log"):
        ours = list(inspect.signature(getattr(Trainer, name)).parameters)
        assert ours == list(inspect.signature(getattr(transformers.Trainer, name)).parameters), name
    calls = []

    def metrics(pred):
        calls.append(pred.predictions.shape)
        return {"seen": float(len(pred.predictions))}

    trainer = Trainer(tiny_llama(), _args(tmp_path, eval_strategy="steps", eval_steps=2),
                      train_dataset=_train_data(), eval_dataset=_eval_data(), compute_metrics=metrics)
    trainer.train(trial={"learning_rate": 1e-2}, ignore_keys_for_eval=["logits"])
    assert calls == [] and trainer.state.trial_params == {"learning_rate": 1e-2}  # no predictions, as in HF
    assert "eval_seen" not in trainer.state.log_history[-2] and "eval_loss" in trainer.state.log_history[-2]
    assert "eval_seen" in trainer.evaluate(ignore_keys=["past_key_values"]) and len(calls) == 1
    kept, dropped = trainer.predict(_eval_data()), trainer.predict(_eval_data(), ignore_keys=["logits"])
    assert kept.predictions.shape == (8, 16, 64) and dropped.predictions is None
    assert dropped.metrics["test_loss"] == pytest.approx(kept.metrics["test_loss"])
    with pytest.raises(ConfigError, match="ignore_keys must be a list"):
        trainer.predict(_eval_data(), ignore_keys="logits")


def test_prediction_step_override_is_traced_into_the_predict_step(tmp_path):
    """DESIGN's override point: a subclass's prediction_step(outputs, batch) decides what evaluate and
    predict keep, compiled into the step; a tuple comes back batch-concatenated leaf by leaf."""
    import jax.numpy as jnp

    class TopToken(Trainer):
        def prediction_step(self, outputs, batch):
            logits = outputs["logits"]
            return jnp.argmax(logits, -1), jnp.max(logits, -1)

    seen = []
    args = _args(tmp_path, per_device_eval_batch_size=3)  # 8 rows: 3 batches, the last with filler rows
    plain = Trainer(tiny_llama(), args).predict(_eval_data())
    top = TopToken(tiny_llama(), args, compute_metrics=lambda p: seen.append(p.predictions) or {}).predict(
        _eval_data())
    ids, best = top.predictions
    assert ids.shape == best.shape == (8, 16)
    np.testing.assert_array_equal(ids, plain.predictions.argmax(-1))  # same forward pass, same weights
    np.testing.assert_allclose(best, plain.predictions.max(-1), rtol=1e-6)  # float32: one compiled graph each
    assert top.metrics["test_loss"] == pytest.approx(plain.metrics["test_loss"], rel=1e-6)
    assert len(seen) == 1 and isinstance(seen[0], tuple) and seen[0][0].shape == (8, 16)


def test_compute_loss_func_with_hfs_signature_trains_like_the_builtin_loss(tmp_path, monkeypatch):
    """HF's compute_loss_func(outputs, labels, num_items_in_batch), written with jax.numpy in HF's
    documented form (a sum over the shifted labels divided by num_items_in_batch), must train exactly
    like jtrain's built-in causal-LM loss: padded rows and 2 accumulated micro-batches, so each
    micro-batch's item count differs and a wrong count would weight them wrongly."""
    import jax.numpy as jnp
    from tiny import padded_lm_batch

    from jtrain.models import cpu_cross_entropy

    # The built-in loss as XLA ops, like the function below: on one CPU device it would otherwise run
    # as the cross-entropy kernel (its own exp and summation order, tested against XLA's ops in
    # test_cpu_cross_entropy), and a few ulp are what this test holds the two losses to.
    monkeypatch.setenv(cpu_cross_entropy.ENV, "xla")

    def hf_causal_lm_loss(outputs, labels, num_items_in_batch):
        logits, shifted = outputs.logits[:, :-1].astype(jnp.float32), labels[:, 1:]
        valid = shifted != -100
        picked = jnp.take_along_axis(logits, jnp.where(valid, shifted, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, jax.nn.logsumexp(logits, -1) - picked, 0.0)) / num_items_in_batch

    data = ArrayDataset(padded_lm_batch(16, 16, seed=5, min_len=4))
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    builtin = Trainer(tiny_llama(), _args(tmp_path / "a", **common), train_dataset=data)
    builtin_out = builtin.train()
    hf_style = Trainer(tiny_llama(), _args(tmp_path / "b", **common), train_dataset=data,
                       compute_loss_func=hf_causal_lm_loss)
    hf_out = hf_style.train()
    # Float32: the same sums, sliced logits here against shifted labels there; measured differences
    # are a few ulp after 3 Adam updates. Counting position 0's labels too (a wrong item count) was
    # measured to move the training loss from 4.157 to 3.648.
    assert hf_out.training_loss == pytest.approx(builtin_out.training_loss, rel=1e-6)
    for a, b in zip(jax.tree.leaves(builtin.params), jax.tree.leaves(hf_style.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="must return jtrain.losses.LossOutput"):
        Trainer(tiny_llama(), _args(tmp_path / "c"), train_dataset=data,
                compute_loss_func=lambda outputs, batch: outputs["logits"].mean()).train()


def test_log_with_start_time_adds_this_calls_token_throughput(tmp_path):
    import time

    trainer = Trainer(tiny_llama(), _args(tmp_path, include_num_input_tokens_seen="all"), train_dataset=_train_data())
    started = time.time()
    trainer.train()
    trainer.log({"custom": 1.0}, start_time=started)
    last = trainer.state.log_history[-1]
    assert last["num_input_tokens_seen"] == 4 * 4 * 16 and last["custom"] == 1.0
    assert last["train_tokens_per_second"] == pytest.approx(256 / last["train_runtime"], rel=1e-2)


def test_speed_metrics_count_samples_and_input_tokens_as_hfs(tmp_path):
    """HF 5 counts an epoch-based run's samples as rows x epochs (10 rows x 2 epochs: 20), and its
    tokens as `include_num_input_tokens_seen` says (non-padding `input_ids`). jtrain used to count
    updates x batch (6 x 4: 24) and, for classification, one "token" per row (the labels). The counts
    are read back as rate x runtime: both round runtime to 1e-4 s and rates to 1e-3 (tokens/s: 0.1), so
    they agree to REL for runtimes from 10 ms up; the old counts are 20% and over 70% off."""
    from test_models_common import with_labels

    REL = 1e-2
    torch_model = hf_model("bert", "sequence_classification")
    torch_model.save_pretrained(tmp_path / "hf")
    model, params = from_pretrained(tmp_path / "hf")
    rows = with_labels(padded_batch("bert", rows=10, length=12, seed=3), "sequence_classification")
    real_tokens = 2 * int(rows["attention_mask"].sum())
    common = dict(num_train_epochs=2, per_device_train_batch_size=4, save_strategy="no", report_to=[],
                  disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    import datasets

    hf = transformers.Trainer(torch_model.train(), transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf_out"), use_cpu=True, **common), train_dataset=datasets.Dataset.from_dict(rows))
    hf_metrics = hf.train().metrics
    ours = Trainer(model, TrainingArguments(output_dir=str(tmp_path / "out"), mesh_shape={"data": 1}, **common),
                   train_dataset=ArrayDataset(rows), params=params)
    metrics = ours.train().metrics
    assert hf.state.global_step == ours.state.global_step == 6
    assert hf.state.num_input_tokens_seen == ours.state.num_input_tokens_seen == real_tokens
    for side in (hf_metrics, metrics):
        assert side["train_samples_per_second"] * side["train_runtime"] == pytest.approx(20, rel=REL)
        assert side["train_steps_per_second"] * side["train_runtime"] == pytest.approx(6, rel=REL)
    assert metrics["train_tokens_per_second"] * metrics["train_runtime"] == pytest.approx(real_tokens, rel=REL)


def test_end_closes_the_loggers(tmp_path):
    from jtrain.reporting import JsonlLoggerCallback

    trainer = Trainer(tiny_llama(), _args(tmp_path, report_to=["jsonl"]), train_dataset=_train_data(),
                      eval_dataset=_eval_data())
    trainer.train()
    trainer.evaluate()  # logs after training reopen the JSONL file
    (jsonl,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, JsonlLoggerCallback)]
    assert jsonl._file is not None and not jsonl._file.closed
    handle = jsonl._file
    trainer.end()
    assert jsonl._file is None and handle.closed
    assert '"eval_loss"' in (tmp_path / "out" / "runs" / "logs.jsonl").read_text().splitlines()[-1]


def test_decay_parameter_names_are_hfs_and_mesh_sizes(tmp_path):
    """The parameters jtrain decays, named as HF names them, are the ones HF's own
    `get_decay_parameter_names` picks on the same model."""
    from jtrain.models.hub import model_leaf_maps

    hf = hf_model("llama", "causal_lm", attention_bias=True)
    hf.save_pretrained(tmp_path / "base")
    model, params = from_pretrained(tmp_path / "base")
    trainer = Trainer(model, _args(tmp_path), params=params)
    ours = set(trainer.get_decay_parameter_names())
    hf_names = {".".join(m.path): m.hf_names for m in model_leaf_maps(model)}
    mapped = {name for jt, names in hf_names.items() if jt in ours for name in names}
    theirs = set(transformers.Trainer.get_decay_parameter_names(None, hf))
    assert mapped == theirs and any("bias" in n for n in hf_names) and not any("bias" in n for n in mapped)
    assert (trainer.get_tp_size(), trainer.get_cp_size(), trainer.get_sp_size()) == (1, 1, 1)
    sharded = Trainer(model, _args(tmp_path, mesh_shape={"tensor": 2, "sequence": 2, "data": 2}), params=params)
    assert (sharded.get_tp_size(), sharded.get_cp_size(), sharded.get_sp_size()) == (2, 2, 1)


def test_save_model_writes_a_transformers_tokenizer_that_autotokenizer_loads(tmp_path):
    """HF's save_model writes the processing_class with the model, so `AutoTokenizer.from_pretrained(dir)`
    works on what it wrote; a transformers tokenizer has `save_pretrained` (no `save`) and was left out."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = "the cat sat on a mat and ran".split()
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([" ".join(words)] * 4, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], disable_tqdm=True, mesh_shape={"data": 1})
    Trainer(tiny_llama(), args, processing_class=tokenizer).save_model(str(tmp_path / "hf"))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = ["the cat sat", "a dog ran on the mat"]
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"] and loaded.pad_token == "[PAD]"
    Trainer(tiny_llama(), args, processing_class=raw).save_model(str(tmp_path / "raw"))  # a `tokenizers` one
    saved = Tokenizer.from_file(str(tmp_path / "raw" / "tokenizer.json"))
    assert saved.encode("the cat").ids == raw.encode("the cat").ids
    from_raw = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "raw"))  # with its tokenizer_config.json
    assert from_raw(text)["input_ids"] == tokenizer(text)["input_ids"] and from_raw.pad_token == "[PAD]"


def test_schedule_free_optimizers_get_the_arguments_warmup_as_hfs_do(tmp_path):
    """HF hands TrainingArguments' warmup_steps to schedulefree's optimizers (a ramp inside the optimizer,
    the one warm-up a constant schedule leaves); jtrain's Trainer did not, so its schedule-free runs had
    none. A ratio is resolved against the run's updates (0.3 of 10: 3)."""
    from jtrain.optim import make_optimizer

    args = TrainingArguments(str(tmp_path), optim="schedule_free_sgd", warmup_steps=0.3, lr_scheduler_type="constant",
                             learning_rate=0.1, max_steps=10, report_to=[], disable_tqdm=True, mesh_shape={"data": 1})
    trainer = Trainer(tiny_llama(), args)
    trainer.create_optimizer_and_scheduler(10)

    def run(tx) -> np.ndarray:
        params, state = {"w": jax.numpy.ones(3)}, tx.init({"w": jax.numpy.ones(3)})
        for g in ([0.3, -0.2, 0.1], [0.1, 0.1, -0.4], [0.2, -0.3, 0.3]):
            updates, state = tx.update({"w": jax.numpy.asarray(g)}, state, params)
            params = optax.apply_updates(params, updates)
        return np.asarray(params["w"])

    warmed = run(make_optimizer("schedule_free_sgd", 0.1, optim_args="warmup_steps=3"))
    np.testing.assert_array_equal(run(trainer.optimizer), warmed)
    assert np.abs(run(make_optimizer("schedule_free_sgd", 0.1)) - warmed).max() > 1e-3  # the warm-up matters here


def test_a_transformers_training_arguments_instance_drives_the_trainer(tmp_path):
    """Code ported from HF builds `transformers.TrainingArguments`; jtrain's Trainer failed on it with
    AttributeError: 'TrainingArguments' object has no attribute 'mesh_shape'. It is read into jtrain's."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                                 learning_rate=3e-3, lr_scheduler_type="constant", report_to=[],
                                                 save_strategy="no", use_cpu=True, disable_tqdm=True,
                                                 logging_steps=1)
    trainer = Trainer(tiny_llama(), hf_args, train_dataset=ArrayDataset(lm_rows(8, 8)))
    assert isinstance(trainer.args, TrainingArguments) and trainer.args.learning_rate == 3e-3
    trainer.train()
    assert [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h] == [3e-3, 3e-3]
    assert trainer.state.global_step == 2
    with pytest.raises(ConfigError, match="args must be a jtrain.TrainingArguments"):
        Trainer(tiny_llama(), {"learning_rate": 1e-3})
