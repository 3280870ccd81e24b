"""Tiny models and batches shared by tests (not a test module)."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os

import numpy as np

from jtrain.callbacks import TrainerCallback
from jtrain.models import create_model

TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_llama(**options):
    return create_model("llama", TINY_LLAMA, **options)


def padded_lm_batch(rows: int, length: int, seed: int = 0, vocab: int = 64, min_len: int = 3) -> dict:
    """Random token rows with unequal right padding; labels are -100 on padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(rows, length)).astype(np.int32)
    lengths = rng.integers(min_len, length + 1, size=rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_rows(num_rows: int, length: int, seed: int = 0, vocab: int = 64) -> dict:
    """Learnable rows (a repeating pattern with noise) so that loss falls quickly."""
    rng = np.random.default_rng(seed)
    start = rng.integers(1, vocab, size=(num_rows, 1))
    ids = ((start + np.arange(length)[None, :] * 3) % (vocab - 1) + 1).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


class LossRecorder(TrainerCallback):
    """The exact per-update loss the step reported (the logged value is rounded to 6 decimals)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_optimizer_step(self, args, state, control, metrics=None, **kwargs):
        self.losses.append(float(metrics["loss"]))


def hf_source_function(torch, relative_path: str, name: str):
    """Function `name` of the installed transformers (e.g. "integrations/neftune.py"), run from its
    source with only torch imported: importing the transformers module that holds it costs 5-8 s of
    CPU on the 2-core test machine. transformers is a test dependency, so its absence is a failure."""
    spec = importlib.util.find_spec("transformers")
    if spec is None:
        raise ImportError("transformers is not installed: install the test extra (pip install -e '.[test]')")
    path = os.path.join(spec.submodule_search_locations[0], *relative_path.split("/"))
    with open(path) as fh:
        tree = ast.parse(fh.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch}
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)  # noqa: S102 - HF's own code
    return namespace[name]


def three_trainer_steps(output_dir, bf16: bool) -> tuple[list[float], str, float]:
    """Losses, step HLO and step FLOPs of three Trainer steps of the tiny Llama on one device."""
    from jtrain import Trainer, TrainingArguments
    from jtrain.data.loader import ArrayDataset
    from jtrain.flops import step_flops

    rows = padded_lm_batch(8, 16, seed=3)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4,
                             bf16=bf16, save_strategy="no", report_to=["none"], disable_tqdm=True,
                             mesh_shape={"data": 1}, logging_steps=1, train_sampling_strategy="sequential")
    trainer = Trainer(tiny_llama(dtype="bfloat16" if bf16 else "float32"), args, train_dataset=ArrayDataset(rows))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    batch = trainer.steps.place_train_batch({k: v[None, :4] for k, v in rows.items()})
    hlo = trainer.steps.train_step.lower(trainer.train_state, batch).as_text()
    return losses, hlo, step_flops(trainer.steps.train_step, trainer.train_state, batch)


def assert_kernel_step_matches_xla(monkeypatch, output_dir, env: str, target: str) -> None:
    """Three float32 Trainer steps with a CPU kernel's setting `env` at `auto` and at `xla`: the
    kernel's custom call `target` is in the first step only, the model FLOPs are the same whichever
    path computes them, and the losses agree to 1e-5 relative (the same float32 arithmetic in
    another order, three AdamW updates apart)."""
    runs = {}
    for mode in ("auto", "xla"):
        monkeypatch.setenv(env, mode)
        runs[mode] = three_trainer_steps(output_dir / mode, bf16=False)
    (losses, hlo, flops), (xla_losses, xla_hlo, xla_flops) = runs["auto"], runs["xla"]
    assert target in hlo and target not in xla_hlo
    assert flops == xla_flops > 0
    np.testing.assert_allclose(losses, xla_losses, rtol=1e-5)
    assert len(losses) == 3


@contextlib.contextmanager
def cpu_kernel_on(monkeypatch, env: str, features: set[str]):
    """A CPU kernel's setting `env` at `auto`, traced for one device; skips where the CPU lacks the
    kernel's instruction sets `features` (the body of the kernel tests' fixtures)."""
    import pytest

    from jtrain.models import cpu_gemm

    if not features <= cpu_gemm.cpu_flags():
        pytest.skip(reason=f"the kernel's loops need {', '.join(sorted(features))}; this CPU lacks them")
    monkeypatch.setenv(env, "auto")
    cpu_gemm.reset()
    with cpu_gemm.single_device(True):
        yield
    cpu_gemm.reset()
