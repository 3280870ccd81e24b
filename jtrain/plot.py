"""`python -m jtrain.plot OUTPUT_DIR [--out FILE.png]`: training curves of a run, as one PNG.

Top: training loss and evaluation loss against the update step; bottom: the learning rate.
The history comes from `trainer_state.json` (the run's, else its latest checkpoint's), or from
the JSONL log (`runs/logs.jsonl`) while a run is still going or after it crashed. matplotlib is
imported only here (`pip install 'jtrain[plot]'`).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Sequence

from jtrain.errors import ConfigError, JtrainError

Series = tuple[list[int], list[float]]


def _checkpoint_step(path: str) -> int:
    try:
        return int(os.path.basename(os.path.dirname(path)).rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def history_file(output_dir: str) -> str:
    """The richest history a run directory holds (see the module docstring for the order)."""
    if not os.path.isdir(output_dir):
        raise ConfigError(f"{output_dir!r} is not a directory (pass a run's output_dir)")
    candidates = [os.path.join(output_dir, "trainer_state.json")]
    candidates += sorted(glob.glob(os.path.join(output_dir, "checkpoint-*", "trainer_state.json")),
                         key=_checkpoint_step, reverse=True)
    candidates += sorted(glob.glob(os.path.join(output_dir, "**", "*.jsonl"), recursive=True))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ConfigError(f"{output_dir!r} holds no trainer_state.json, checkpoint-*/trainer_state.json or "
                      "runs/logs.jsonl: nothing to plot (log with report_to: [jsonl] to plot a running job)")


def read_history(path: str) -> list[dict]:
    """Log records: `log_history` of a trainer_state.json, or the lines of a JSONL log."""
    try:
        with open(path, encoding="utf-8") as fh:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in fh if line.strip()]
            return list(json.load(fh)["log_history"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read the training history in {path!r}: {err}") from err


def series(records: Sequence[dict], key: str) -> Series:
    """(steps, values) of every record that logged a finite number under `key`."""
    points = [(int(r["step"]), float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and "step" in r and float(r[key]) == float(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ConfigError("plotting needs matplotlib: pip install 'jtrain[plot]' (or pip install matplotlib)") from err
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_history(records: Sequence[dict], out_path: str, title: str = "") -> str:
    """Draw loss (train, eval) and learning rate against the step into `out_path` (PNG)."""
    train, evals, lr = series(records, "loss"), series(records, "eval_loss"), series(records, "learning_rate")
    if not (train[0] or evals[0]):
        raise ConfigError("the history has no loss or eval_loss records to plot (was logging_steps reached?)")
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if train[0]:
        top.plot(*train, label="training loss", color="tab:blue", linewidth=1.5)
    if evals[0]:
        top.plot(*evals, label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    top.set_ylabel("loss")
    top.set_title(title or "training curves")
    top.grid(alpha=0.3)
    top.legend()
    if lr[0]:
        bottom.plot(*lr, color="tab:green", linewidth=1.5)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_run(output_dir: str, out_path: str | None = None) -> str:
    """Plot a run directory's history; the PNG goes to `out_path` or OUTPUT_DIR/training_curves.png."""
    source = history_file(output_dir)
    out_path = out_path or os.path.join(output_dir, "training_curves.png")
    title = f"{os.path.basename(os.path.abspath(output_dir))} ({os.path.relpath(source, output_dir)})"
    return plot_history(read_history(source), out_path, title)


USAGE = "usage: python -m jtrain.plot OUTPUT_DIR [--out FILE.png]"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nDraws training/eval loss and the learning rate against the step from trainer_state.json "
              "(or runs/logs.jsonl) into a PNG (default OUTPUT_DIR/training_curves.png).")
        return 0 if argv else 2
    try:
        if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--out"):
            raise ConfigError(USAGE)
        path = plot_run(argv[0], argv[2] if len(argv) == 3 else None)
    except JtrainError as err:
        print(f"jtrain: error: {err}", file=sys.stderr)
        return 2
    print(f"[jtrain] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
