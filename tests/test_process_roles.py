"""HF's process-role and re-initialisation semantics: `TrainingArguments`' process properties
(`process_index`, `local_process_index`, `world_size`, `should_log`, `should_save`,
`get_process_log_level`, `main_process_first`), `log_level`, the Trainer's refusals of
optimizer arguments that exclude each other, and `model_init` re-run at every `train()`.

The two-process side (two ranks on one host: local indices 0 and 1) runs in
tests/test_multihost.py's worker.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import optax
import pytest
from tiny import lm_rows, tiny_llama

from jtrain import Trainer, TrainingArguments
from jtrain import distributed as jd
from jtrain.data.loader import ArrayDataset
from jtrain.errors import ConfigError


def _args(tmp_path, **kw):
    return TrainingArguments(**{"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
                                "learning_rate": 1e-2, "save_strategy": "no", "disable_tqdm": True,
                                "mesh_shape": {"data": 1}, "report_to": [], **kw})


@pytest.fixture
def hosts(monkeypatch):
    """Pretend to be a process of a multi-host job: (local index, host count) and the process index."""
    def set_roles(local: int, host_count: int, process: int) -> None:
        monkeypatch.setattr(jd, "_HOST_RANKS", (local, host_count))
        monkeypatch.setattr(jax, "process_index", lambda *a: process)
        monkeypatch.setattr(jax, "process_count", lambda *a: 4)
    yield set_roles


def test_single_process_roles(tmp_path):
    args = _args(tmp_path)
    assert (args.process_index, args.local_process_index, args.world_size) == (0, 0, 1)
    assert args.should_log and args.should_save
    ran = []
    with args.main_process_first(desc="tokenize"):
        ran.append(1)
    assert ran == [1]


def test_should_log_and_should_save_follow_hfs_rules(hosts, tmp_path):
    # Process 2 of 4 is the first process of the second host.
    hosts(local=0, host_count=2, process=2)
    args = _args(tmp_path)
    assert args.should_log and not args.should_save  # log_on_each_node defaults to true, save_on_each_node to false
    assert not args.replace(log_on_each_node=False).should_log
    assert args.replace(save_on_each_node=True).should_save
    # Process 3: the second process of that host.
    hosts(local=1, host_count=2, process=3)
    assert not args.should_log and not args.replace(save_on_each_node=True).should_save


def test_process_log_level_and_its_validation(hosts, tmp_path):
    args = _args(tmp_path, log_level="info", log_level_replica="error")
    assert args.get_process_log_level() == logging.INFO
    hosts(local=1, host_count=1, process=1)  # a replica: log_level_replica applies
    assert args.get_process_log_level() == logging.ERROR
    passive = _args(tmp_path, log_level_replica="passive")
    assert passive.get_process_log_level() == logging.getLogger("jtrain").getEffectiveLevel()
    with pytest.raises(ConfigError, match="log_level_replica"):
        _args(tmp_path, log_level_replica="loud")


def test_trainer_sets_jtrains_log_level(tmp_path):
    logger = logging.getLogger("jtrain")
    before = logger.level
    try:
        Trainer(tiny_llama(), _args(tmp_path, log_level="error"))
        assert logger.level == logging.ERROR
        logger.setLevel(logging.DEBUG)
        Trainer(tiny_llama(), _args(tmp_path))  # passive: left as it is
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)


def test_save_on_each_node_is_refused_across_hosts_only(hosts, tmp_path):
    Trainer(tiny_llama(), _args(tmp_path, save_on_each_node=True))  # one host: the same as the default
    hosts(local=0, host_count=2, process=0)
    with pytest.raises(ConfigError, match="save_on_each_node.*2 hosts.*shared"):
        Trainer(tiny_llama(), _args(tmp_path, save_on_each_node=True))


def test_optimizer_arguments_that_exclude_each_other(tmp_path):
    pair = (optax.sgd(1e-2), None)
    with pytest.raises(ConfigError, match="either `optimizers` or `optimizer_cls_and_kwargs`"):
        Trainer(tiny_llama(), _args(tmp_path), optimizers=pair, optimizer_cls_and_kwargs=(optax.sgd, {}))
    with pytest.raises(ConfigError, match="model_init.*optimizer_cls_and_kwargs"):
        Trainer(model_init=tiny_llama, args=_args(tmp_path), optimizers=pair)


def test_model_init_gives_every_train_a_fresh_model(tmp_path):
    """As HF: with model_init, a second train() trains a new model instead of continuing the first,
    so (same seed, same data) both end at the same weights; train(trial) builds from that trial."""
    calls = []

    def init(trial):
        calls.append(trial)
        return tiny_llama()

    data = ArrayDataset(lm_rows(24, 16))
    trainer = Trainer(model_init=init, args=_args(tmp_path), train_dataset=data)
    first = trainer.train()
    after_first = [np.asarray(x) for x in jax.tree.leaves(trainer.params)]
    second = trainer.train()
    after_second = [np.asarray(x) for x in jax.tree.leaves(trainer.params)]
    assert calls == [None, None]  # construction, then the second train(); the first reused the unused model
    assert trainer.state.global_step == 3 and second.training_loss == pytest.approx(first.training_loss, rel=1e-6)
    for a, b in zip(after_first, after_second):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # one float32 rounding of the same 3 updates
    trainer.train(trial={"lr": 3})
    assert calls[-1] == {"lr": 3} and trainer.state.trial_params == {"lr": 3}


def test_a_second_train_without_model_init_is_a_new_run_on_the_trained_weights(tmp_path):
    """As HF: train() again starts a new run (a fresh TrainerState, the schedule from its start) on the
    weights the first left, so its first loss and every learning rate are those of a new Trainer given
    those weights; the optimizer keeps its moments, as HF's (tests/test_trainer.py compares the losses
    with HF's), so the later updates are not that Trainer's. Checkpoints of the second run land in the
    same output_dir, as HF's."""
    data = ArrayDataset(lm_rows(24, 16))
    args = _args(tmp_path, logging_steps=1, save_strategy="steps", save_steps=3)
    trainer = Trainer(tiny_llama(), args, train_dataset=data)
    first = trainer.train()
    trained = jax.tree.map(np.asarray, trainer.params)
    second = trainer.train()
    assert second.global_step == 3 and trainer.state.global_step == 3
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]  # a fresh TrainerState
    assert second.training_loss < first.training_loss  # it trained on (the same rows again)
    reference = Trainer(tiny_llama(), args.replace(output_dir=str(tmp_path / "reference")), train_dataset=data,
                        params=trained)
    expected = reference.train()
    logged = lambda t, key: [h[key] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert logged(trainer, "learning_rate") == logged(reference, "learning_rate")  # the schedule restarted
    assert logged(trainer, "loss")[0] == logged(reference, "loss")[0]  # the same weights
    assert logged(trainer, "loss")[1:] != logged(reference, "loss")[1:]  # Adam's moments carried over
    assert second.training_loss != expected.training_loss
    assert (tmp_path / "out" / "checkpoint-3").is_dir()
    from jtrain.checkpoint import restore_state

    saved = restore_state(str(tmp_path / "out" / "checkpoint-3"), trainer.train_state, params_only=True)
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(trainer.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the second run's, overwriting the first's


def test_logged_epoch_is_not_rounded(tmp_path):
    """HF 5's `log` records `state.epoch` as it is (earlier versions rounded it)."""
    trainer = Trainer(tiny_llama(), _args(tmp_path, logging_steps=1), train_dataset=ArrayDataset(lm_rows(12, 16)))
    trainer.train()
    logged = [h["epoch"] for h in trainer.state.log_history if "loss" in h]
    assert logged[0] == pytest.approx(1 / 3, abs=1e-12)  # 12 rows in batches of 4: 3 updates per epoch


def test_a_second_train_with_another_optimizer_starts_its_state_fresh_and_says_so(tmp_path, caplog):
    """The arguments changed `optim` between the runs: the previous state cannot carry over (another
    structure), so the new optimizer starts fresh, with a warning rather than a tree-mismatch error."""
    import logging

    trainer = Trainer(tiny_llama(), _args(tmp_path), train_dataset=ArrayDataset(lm_rows(12, 16)))
    trainer.train()
    trainer.args = trainer.args.replace(optim="sgd")
    with caplog.at_level(logging.WARNING, logger="jtrain.trainer_setup"):
        second = trainer.train()
    assert second.global_step == 3 and np.isfinite(second.training_loss)
    assert any("optimizer differs from the previous run's" in r.getMessage() for r in caplog.records)
