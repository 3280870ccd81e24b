"""`python -m jtrain.plot`: a readable PNG of loss and learning rate from a run's history."""

from __future__ import annotations

import json
import sys

import pytest

from jtrain.errors import ConfigError
from jtrain.plot import main, plot_run, read_history, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history(steps: int = 60) -> list[dict]:
    records = []
    for step in range(10, steps + 1, 10):
        records.append({"loss": 5.0 / step ** 0.3, "learning_rate": 1e-3 * (1 - step / steps), "grad_norm": 1.0,
                        "epoch": step / steps, "step": step})
        if step % 30 == 0:
            records.append({"eval_loss": 5.5 / step ** 0.3, "eval_accuracy": 0.1, "step": step})
    records.append({"train_loss": 3.0, "train_runtime": 1.0, "step": steps})
    return records


def test_plot_from_trainer_state(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history(), "global_step": 60}))
    path = plot_run(str(tmp_path))
    assert path == str(tmp_path / "training_curves.png")
    data = (tmp_path / "training_curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_falls_back_to_checkpoint_then_jsonl(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "logs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history(40)))
    assert main([str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert "curves.png" in capsys.readouterr().out
    ckpt = tmp_path / "checkpoint-20"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": history(20)}))
    from jtrain.plot import history_file
    assert history_file(str(tmp_path)) == str(ckpt / "trainer_state.json")


def test_series_keeps_finite_logged_values():
    steps, values = series(history() + [{"loss": float("nan"), "step": 70}], "loss")
    assert steps == [10, 20, 30, 40, 50, 60] and len(values) == 6
    assert series(history(), "eval_loss")[0] == [30, 60]


def test_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main([str(tmp_path)]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    (tmp_path / "trainer_state.json").write_text("{broken")
    with pytest.raises(ConfigError, match="cannot read"):
        read_history(str(tmp_path / "trainer_state.json"))


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history()}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'jtrain\[plot\]'"):
        plot_run(str(tmp_path))
