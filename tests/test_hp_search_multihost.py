"""`hyperparameter_search` over two JAX processes (`python -m jtrain.launch` runs this file as a
worker): process 0 holds the optuna study and shares each trial's values and every pruning
decision; the other process trains the same trials in step. The 2-process search must pick the
same trial, with the same values and objective, as the same search in one process on 8 devices.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from test_multihost import LOSS_RTOL, _finish, _launch


def test_a_two_process_search_equals_a_one_process_search(tmp_path):
    worker = [sys.executable, os.path.abspath(__file__)]
    runs = {"1x8": _launch(1, 8, *worker, str(tmp_path / "one")), "2x4": _launch(2, 4, *worker, str(tmp_path / "two"))}
    results = {name: _finish(proc) for name, proc in runs.items()}
    for name, (code, out, err) in results.items():
        assert code == 0, f"{name} exited {code}\n{out[-3000:]}\n{err[-3000:]}"
    reports = {}
    for name, (_, out, _) in results.items():
        for line in out.splitlines():
            if "SEARCH " in line:
                report = json.loads(line.split("SEARCH ", 1)[1])
                reports[(name, report["process"])] = report
    assert sorted(reports) == [("1x8", 0), ("2x4", 0), ("2x4", 1)]
    one, zero, follower = reports["1x8", 0], reports["2x4", 0], reports["2x4", 1]
    # Trial 1 is pruned at its first evaluation (step 1 of 3) on both processes: the follower obeyed
    # process 0's decision instead of training on into a collective process 0 never joins.
    for report in (one, zero, follower):
        assert report["train_ends"] == [3, 1], report
        assert report["best"][0] == "0" and report["seen"] == one["seen"]  # same trials, same values
    assert follower["best"] == zero["best"]  # the follower returns process 0's BestRun
    assert one["seen"][1:] == [one["best"][2], one["seen"][2]] and one["seen"][0] is None
    # The objective is trial 0's last eval loss; the 2-process mesh sums in another order (see test_multihost).
    np.testing.assert_allclose(zero["best"][1], one["best"][1], rtol=LOSS_RTOL)
    assert sorted(os.listdir(tmp_path / "two" / "search")) == ["run-0", "run-1"]  # each trial logged in its own


def _worker(out_dir: str) -> None:
    from jtrain.distributed import maybe_initialize

    maybe_initialize()
    import jax
    import optuna

    from jtrain import Trainer, TrainerCallback, TrainingArguments
    from jtrain.data.loader import ArrayDataset
    from tiny import lm_rows, tiny_llama

    class PruneTrialOne(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1

    class TrainEnds(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_train_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    seen, ends = [], TrainEnds()

    def model_init(trial):
        seen.append(None if trial is None else dict(trial.params))  # process 1 reads the shared copy
        return tiny_llama()

    args = TrainingArguments(output_dir=os.path.join(out_dir, "search"), max_steps=3, eval_strategy="steps",
                             eval_steps=1, per_device_train_batch_size=1, per_device_eval_batch_size=1,
                             save_strategy="no", disable_tqdm=True, report_to=["jsonl"])
    trainer = Trainer(model_init=model_init, args=args, train_dataset=ArrayDataset(lm_rows(32, 16)),
                      eval_dataset=ArrayDataset(lm_rows(8, 16, seed=1)), callbacks=[ends])
    best = trainer.hyperparameter_search(
        hp_space=lambda t: {"learning_rate": t.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
        n_trials=2, sampler=optuna.samplers.RandomSampler(seed=0), pruner=PruneTrialOne())
    # One write of the whole line: print() writes the text and the newline separately, and Gloo's
    # messages (written to the same stdout from its threads) could land between them, inside the JSON's line.
    report = json.dumps({"process": jax.process_index(), "best": list(best), "seen": seen, "train_ends": ends.steps})
    sys.stdout.write(f"SEARCH {report}\n")
    sys.stdout.flush()
    trainer.end()


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    _worker(sys.argv[1])
