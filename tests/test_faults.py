"""Faults: a non-finite loss, SIGTERM, an output_dir that cannot be written, bad resume requests.

SIGTERM is also tested across processes, with SIGKILL, in test_resume_kill.py.
"""

from __future__ import annotations

import os
import signal
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain import CheckpointError, ConfigError, NonFiniteError, Trainer, TrainerCallback, TrainingArguments
from jtrain.checkpoint import checkpoint_dirs, is_complete, read_json, restore_state
from jtrain.data.loader import ArrayDataset
from jtrain.losses import causal_lm_loss
from jtrain.output_dir import check_writable, resume_point
from jtrain.signals import EXIT_PREEMPTED, TrainingPreempted
from tiny import lm_rows, tiny_llama

POISON = 63  # a token id lm_rows(vocab=60) never produces


def _poisoned_data(rows: int, first_bad_row: int) -> ArrayDataset:
    cols = lm_rows(rows, 16, vocab=60)
    cols["input_ids"][first_bad_row:, 0] = POISON
    return ArrayDataset(cols)


def _nan_after_poison(outputs, batch):
    """The causal-LM loss, but NaN for a batch that holds the poison token (traced into the step)."""
    out = causal_lm_loss(outputs, batch)
    poisoned = jnp.any(batch["input_ids"] == POISON)
    return out._replace(loss_sum=jnp.where(poisoned, jnp.nan, out.loss_sum))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    # Sequential order, 4 rows per update: rows 16.. are poisoned, so update 5 is the first NaN; every
    # step is a save step, so the save at step 5 is the one that must not happen.
    args = TrainingArguments(output_dir=str(out), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=1, save_total_limit=2, logging_steps=100, disable_tqdm=True,
                             mesh_shape={"data": 1}, train_sampling_strategy="sequential")
    trainer = Trainer(tiny_llama(), args, train_dataset=_poisoned_data(40, 16), compute_loss_func=_nan_after_poison)
    with pytest.raises(NonFiniteError, match="at step 5"):
        trainer.train()
    dirs = checkpoint_dirs(str(out), complete_only=False)
    assert [os.path.basename(d) for d in dirs] == ["checkpoint-3", "checkpoint-4"]  # complete; none for 5
    restored = restore_state(dirs[-1], trainer.train_state)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(restored.params))
    # The non-finite updates (5, and 6 dispatched behind it) were not applied: the live params are
    # still step 4's, bitwise.
    for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("nan_inf_filter", [True, False])
def test_skipped_nonfinite_updates_leave_the_logged_loss_as_hfs_filter_says(tmp_path, nan_inf_filter):
    """Under `nonfinite_policy: skip`, update 3's loss is NaN. With `logging_nan_inf_filter` (HF's default)
    the logged mean and train_loss are the mean of the finite losses (the skipped update counted as 0 pulled
    them down by a third); without it, the window's mean is NaN, as HF logs it."""
    data = lm_rows(12, 16, vocab=60)
    data["input_ids"][8:, 0] = POISON  # rows 8-11: update 3 of 4-row batches
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             logging_steps=3, save_strategy="no", disable_tqdm=True, mesh_shape={"data": 1},
                             train_sampling_strategy="sequential", nonfinite_policy="skip",
                             logging_nan_inf_filter=nan_inf_filter)
    trainer = Trainer(tiny_llama(), args, train_dataset=ArrayDataset(data), compute_loss_func=_nan_after_poison)
    result = trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and logged[0]["skipped_updates"] == 1
    # the two finite losses, from a run of the same two updates (no NaN in it)
    clean = Trainer(tiny_llama(), args.replace(max_steps=2, logging_steps=1), train_dataset=ArrayDataset(data))
    clean.train()
    finite = [h["loss"] for h in clean.state.log_history if "loss" in h]
    if nan_inf_filter:
        assert logged[0]["loss"] == pytest.approx(np.mean(finite), rel=1e-6)  # one rounding of the logged values
        assert result.training_loss == pytest.approx(np.mean(finite), rel=1e-6)
    else:
        assert np.isnan(logged[0]["loss"]) and np.isnan(result.training_loss)


class _TermAt(TrainerCallback):
    """Sends this process SIGTERM from inside update `step` (Python runs the handler right away)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_finishes_the_step_checkpoints_it_and_exits_143(tmp_path):
    """Also covers save_strategy=epoch: 16 rows / 4 = 4 updates per epoch, so checkpoint-4 is the
    end of epoch 0, and SIGTERM in update 6 adds checkpoint-6 in the middle of epoch 1."""
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    args = TrainingArguments(output_dir=str(out), max_steps=-1, num_train_epochs=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="epoch", logging_steps=100, disable_tqdm=True,
                             mesh_shape={"data": 1})
    trainer = Trainer(tiny_llama(), args, train_dataset=ArrayDataset(lm_rows(16, 16)), callbacks=[_TermAt(6)])
    with pytest.raises(TrainingPreempted) as info:
        trainer.train()
    assert info.value.code == EXIT_PREEMPTED == 143
    assert trainer.state.global_step == 6  # the update in flight finished; no later one started
    dirs = checkpoint_dirs(str(out), complete_only=False)
    assert [os.path.basename(d) for d in dirs] == ["checkpoint-4", "checkpoint-6"] and all(map(is_complete, dirs))
    assert read_json(os.path.join(dirs[0], "loader_state.json")) == {"epoch": 0, "batch_index": 4}
    assert read_json(os.path.join(dirs[1], "loader_state.json")) == {"epoch": 1, "batch_index": 2}
    assert "stopped by SIGTERM after step 6" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only as long as train()


def test_output_dir_behind_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        check_writable(str(tmp_path / "file" / "out"))
    with pytest.raises(CheckpointError, match="not a directory"):
        check_writable(str(tmp_path / "file"))
    check_writable(str(tmp_path / "new" / "deeper"))  # creatable: fine, and nothing was created
    assert not (tmp_path / "new").exists()


def test_output_dir_without_permission_is_refused(tmp_path, monkeypatch):
    """A directory without write permission. Root ignores permission bits, so `os.access` is made
    to answer from the bits themselves, as it does for any other user: the test runs the same
    for every user instead of skipping under root (CI's user)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)

    def access_by_bits(path, mode):
        return not (mode & os.W_OK) or bool(os.stat(path).st_mode & stat.S_IWUSR)

    monkeypatch.setattr("jtrain.output_dir.os.access", access_by_bits)
    try:
        with pytest.raises(CheckpointError, match="not writable"):
            check_writable(str(locked / "out"))
    finally:
        locked.chmod(stat.S_IRWXU)


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs Linux sysfs")
def test_output_dir_on_a_filesystem_that_refuses_files_is_refused():
    # sysfs refuses new files even for root, whose permission bits os.access waves through: the
    # write probe catches it (as it would a read-only mount).
    with pytest.raises(CheckpointError, match="not writable"):
        check_writable("/sys/jtrain-out")


def _args(out, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=2, disable_tqdm=True, do_train=True, **kw)


def test_resume_requests_are_checked_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not exist"):
        resume_point(_args(out, resume_from_checkpoint=str(tmp_path / "checkpoint-9")))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resume_point(_args(out, resume_from_checkpoint="true"))
    partial = out / "checkpoint-4"
    (partial / "state.orbax-checkpoint-tmp-1").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete"):
        resume_point(_args(out, resume_from_checkpoint=str(partial)))
    # A run killed before its first checkpoint completed: refused as HF does, saying why.
    with pytest.raises(ConfigError, match=r"checkpoint-4 \(incomplete\).*overwrite_output_dir"):
        resume_point(_args(out))
    assert resume_point(_args(out, overwrite_output_dir=True)) is None
    assert sorted(os.listdir(out)) == ["checkpoint-4"]


def test_a_checkpoint_of_hfs_pytorch_trainer_is_refused_with_what_carries_over(tmp_path):
    """A checkpoint-N/ written by HF's PyTorch Trainer (model.safetensors, optimizer.pt, ...) cannot
    resume here (its optimizer state is torch's): named or found by resume_from_checkpoint=True, the
    error says so and how to keep its weights; the directory is left as it was."""
    import transformers
    from test_models_common import hf_model

    out = tmp_path / "out"
    hf_dir = out / "checkpoint-5"
    hf_model("llama", "causal_lm").save_pretrained(hf_dir)
    for name in ("optimizer.pt", "rng_state.pth", "training_args.bin"):  # what HF's _save_checkpoint adds
        (hf_dir / name).write_bytes(b"")
    transformers.TrainerState(global_step=5).save_to_json(str(hf_dir / "trainer_state.json"))
    before = sorted(os.listdir(hf_dir))
    model = tiny_llama()
    for request in (str(hf_dir), True):
        trainer = Trainer(model, _args(out, overwrite_output_dir=True), train_dataset=ArrayDataset(lm_rows(8, 16)))
        with pytest.raises(CheckpointError, match=r"checkpoint-5' was written by HF's PyTorch Trainer.*"
                                                  r"jtrain.models.from_pretrained\(path\)"):
            trainer.train(resume_from_checkpoint=request)
    assert sorted(os.listdir(hf_dir)) == before and sorted(os.listdir(out)) == ["checkpoint-5"]


def test_a_checkpoint_of_another_optimizer_is_refused_with_what_to_do(tmp_path):
    """A checkpoint written with another `optim` (or an older jtrain's layout) has another state tree:
    orbax's message says only that the structures differ; the error adds why and the two ways on,
    and the checkpoint is left as it was."""
    out = tmp_path / "out"
    data = ArrayDataset(lm_rows(16, 16))
    Trainer(tiny_llama(), _args(out, save_steps=2, optim="adamw_torch"), train_dataset=data).train()
    before = sorted(os.listdir(out / "checkpoint-2"))
    other = Trainer(tiny_llama(), _args(out, save_steps=2, optim="sgd").replace(max_steps=4), train_dataset=data)
    with pytest.raises(CheckpointError, match=r"checkpoint-2'.*laid out differently.*another `optim`.*"
                                              r"training_args.json.*jtrain.models.from_pretrained"):
        other.train(resume_from_checkpoint=True)
    assert sorted(os.listdir(out / "checkpoint-2")) == before
