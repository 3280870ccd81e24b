"""`hp_search:` in a run config: HF's hyperparameter_search (optuna) from `python -m jtrain.run`'s
entry point, on a tiny stdlib causal LM; and the refusals of a bad search section."""

from __future__ import annotations

import json

import pytest

from jtrain.run import main

CONFIG = """
model:
  model_type: llama
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}
tokenizer: {vocab_size: 256}
data: {source: stdlib, max_files: 12, block_size: 32, max_eval_rows: 32}
hp_search:
  n_trials: 2
  sampler: grid
  metric: loss
  space:
    learning_rate: {type: categorical, choices: [0.0, 1.0e-2]}
training:
  output_dir: OUT
  do_eval: true
  max_steps: 12
  per_device_train_batch_size: 8
  eval_strategy: steps
  eval_steps: 6
  save_strategy: "no"
  disable_tqdm: true
  report_to: [jsonl]
  logging_steps: 4
  mesh_shape: {data: 1}
"""


def _config(tmp_path, text: str = CONFIG) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(text.replace("OUT", str(tmp_path / "out")))
    return str(path)


def test_a_search_from_the_run_config_ranks_trials_on_the_eval_loss(tmp_path, capsys):
    assert main(["--config", _config(tmp_path)]) == 0
    best = json.loads((tmp_path / "out" / "best_run.json").read_text())
    assert best["best_hyperparameters"] == {"learning_rate": 1.0e-2}  # a zero learning rate learns nothing
    for run in ("run-0", "run-1"):  # each trial trained in its own directory with its own learning rate
        logs = [json.loads(line) for line in (tmp_path / "out" / run / "runs" / "logs.jsonl").read_text().splitlines()]
        rates = {e["learning_rate"] for e in logs if "learning_rate" in e}
        evals = [e["eval_loss"] for e in logs if "eval_loss" in e]
        assert len(evals) == 2 and (rates == {0.0}) == (evals[0] == evals[1])  # lr 0: the model never changes
    printed = capsys.readouterr().out
    assert f"best of 2 trials is run-{best['best_run_id']} (eval_loss {best['best_objective']:.4f})" in printed
    # The same output_dir again is refused (a search never resumes) unless told to overwrite it.
    assert main(["--config", _config(tmp_path)]) == 2
    assert "overwrite_output_dir" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (("metric: loss", "metric: loss\n  direction: sideways"), "direction must be minimize or maximize"),
    (("type: categorical, choices: [0.0, 1.0e-2]", "type: float, low: 1.0e-2, high: 1.0e-4"),
     "need low <= high"),
    (("learning_rate: {", "learning_rat: {"), "did you mean `learning_rate`"),
    (("sampler: grid", "sampler: grid\n  n_trials: 0"), "n_trials must be at least 1"),
    (("  do_eval: true\n", ""), "set training.do_train and training.do_eval true"),
])
def test_bad_search_sections_are_refused_before_anything_runs(tmp_path, capsys, change, message):
    assert main(["--config", _config(tmp_path, CONFIG.replace(*change))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_shipped_search_config_is_valid():
    import os

    from jtrain.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "hp_search.yaml"))
    assert cfg.hp_search.n_trials == 4 and set(cfg.hp_search.space) == {"learning_rate", "warmup_steps"}
