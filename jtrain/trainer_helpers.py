"""HF's `Trainer` helper methods that example scripts call around train/evaluate/predict.

`log_metrics`, `save_metrics`, `save_state` and `metrics_format` are what every HF example
script ends with (`trainer.log_metrics("train", metrics)`, ...): same output, same files, same
process-zero rule, so such a script runs on jtrain unchanged. The getters answer from jtrain's
own state (the compiled step's schedule and lr factor, the trainable part of the params).
They are bound onto `jtrain.Trainer` as methods, as HF binds its `trainer_pt_utils` ones.
"""

from __future__ import annotations

import datetime
import inspect
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jtrain.errors import ConfigError
from jtrain.jsonfile import atomic_write, read_json_object, write_json
from jtrain.models.base import param_count
from jtrain.param_split import split_params


def _seconds_text(seconds: float) -> str:
    """h:mm:ss.cc, as HF prints runtimes."""
    centis = int(abs(seconds - int(seconds)) * 100)
    return f"{datetime.timedelta(seconds=int(seconds))}.{centis:02d}"


def metrics_format(metrics: dict[str, Any]) -> dict[str, Any]:
    """A copy of `metrics` for reading: memory in MB, runtimes as h:mm:ss, FLOPs in GF, floats to 4 places."""
    out = dict(metrics)
    for key, value in out.items():
        if "_mem_" in key and isinstance(value, (int, float)):
            out[key] = f"{int(value) >> 20}MB"
        elif "_runtime" in key and isinstance(value, (int, float)):
            out[key] = _seconds_text(value)
        elif key == "total_flos":
            out[key] = f"{int(value) >> 30}GF"
        elif isinstance(value, float):
            out[key] = round(value, 4)
    return out


def log_metrics(self: Any, split: str, metrics: dict[str, Any]) -> None:
    """Print `metrics` under a `***** {split} metrics *****` header, aligned (process zero only)."""
    if not self.is_world_process_zero() or not metrics:
        return
    print(f"***** {split} metrics *****")
    shown = metrics_format(metrics)
    key_width = max(len(str(k)) for k in shown)
    value_width = max(len(str(v)) for v in shown.values())
    for key in sorted(shown):
        print(f"  {key: <{key_width}} = {shown[key]:>{value_width}}")


def save_metrics(self: Any, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
    """`{output_dir}/{split}_results.json`, and (`combined`) the same keys merged into
    `all_results.json`, as HF writes them (process zero only)."""
    if not self.is_world_process_zero():
        return
    os.makedirs(self.args.output_dir, exist_ok=True)
    write_json(os.path.join(self.args.output_dir, f"{split}_results.json"), metrics, indent=4)
    if combined:
        path = os.path.join(self.args.output_dir, "all_results.json")
        everything = read_json_object(path, what="the combined results file") if os.path.exists(path) else {}
        everything.update(metrics)
        write_json(path, everything, indent=4)


def save_state(self: Any) -> None:
    """`{output_dir}/trainer_state.json` (process zero only); `save_model` does not write it."""
    if not self.is_world_process_zero():
        return
    os.makedirs(self.args.output_dir, exist_ok=True)
    atomic_write(os.path.join(self.args.output_dir, "trainer_state.json"), self.state.save_to_json)


def _is_model(obj: Any) -> bool:
    """A jtrain Model or a wrapper of one (LoRA, quantised): what the compiled steps can run."""
    return all(hasattr(obj, name) for name in ("apply", "abstract_params", "logical_axes", "task"))


def call_model_init(self: Any, trial: Any = None, params: Any = None) -> tuple[Any, Any]:
    """`model_init()` or `model_init(trial)`, as HF calls it; returns (model, initial params)."""
    try:  # positional parameters only: a model factory with **options still takes no trial
        arity = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                    for p in inspect.signature(self.model_init).parameters.values())
    except (TypeError, ValueError):
        arity = 0
    if arity > 1:
        raise ConfigError("model_init takes no argument or one (the hyperparameter-search trial); "
                          f"this one takes {arity}")
    made = self.model_init(trial) if arity == 1 else self.model_init()
    if isinstance(made, tuple) and len(made) == 2 and _is_model(made[0]):
        return made
    if not _is_model(made):
        raise ConfigError(f"model_init returned a {type(made).__name__}; it must return a jtrain Model "
                          "or a (Model, params) pair, e.g. jtrain.models.from_pretrained(path)")
    return made, params


def log(self: Any, logs: dict[str, float], start_time: float | None = None) -> None:
    """Add epoch and step, append to `log_history`, fire `on_log` (as HF's `Trainer.log`). With
    `start_time` (a `time.time()` of this train() call's start) and token counting on, add HF's
    `train_runtime` and `train_tokens_per_second` of this call. As HF's, the epoch (and token count)
    go into `logs` itself, so the metrics evaluate() and train() return carry them too."""
    if self.state.epoch is not None:
        logs["epoch"] = float(self.state.epoch)
    if self.args.include_num_input_tokens_seen != "no":
        logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        if start_time is not None:
            runtime = max(time.time() - start_time, 1e-9)
            tokens = self.state.num_input_tokens_seen - getattr(self, "_initial_num_input_tokens_seen", 0)
            logs.update(train_runtime=round(runtime, 4), train_tokens_per_second=round(tokens / runtime, 3))
    self.state.log_history.append({**logs, "step": self.state.global_step})
    self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs=logs)


def reinit_from_model_init(self: Any, trial: Any = None) -> None:
    """HF's model re-init at train(): a fresh model from `model_init(trial)`, and everything built
    for the old one dropped (compiled steps, state, optimizer, schedule) so train() rebuilds them;
    a fresh TrainerState too, as HF's train() starts one (a resume then loads the saved one)."""
    model, params = self.call_model_init(trial, self._init_arguments["params"])
    self.model, self._initial_params = model, params
    self.callback_handler.model = model
    self.steps = self.train_state = self._step_plan = None
    self.optimizer = self.lr_scheduler = self.lr_controller = None
    fresh_trainer_state(self)


def fresh_trainer_state(self: Any) -> None:
    """A new TrainerState and TrainerControl, as HF's train() starts each run with (the process
    flags and whether this is a hyperparameter search carry over)."""
    from jtrain.callbacks import TrainerControl, TrainerState

    old = self.state
    self.state = TrainerState(is_local_process_zero=old.is_local_process_zero,
                              is_world_process_zero=old.is_world_process_zero,
                              is_hyper_param_search=old.is_hyper_param_search)
    self.control = TrainerControl()


def get_num_trainable_parameters(self: Any) -> int:
    """Parameters the optimizer updates (a LoRA run: the adapters only), before or after setup."""
    if self.train_state is not None:
        return param_count(self.train_state.params)
    tree = self.model.abstract_params()
    trainable = getattr(self.model, "is_trainable", None)
    return param_count(tree if trainable is None else split_params(tree, trainable)[0])


def non_embedding_parameter_count(self: Any) -> int:
    """Parameters outside embedding tables (Flax `nn.Embed` leaves are named `embedding`), as HF's
    `num_parameters(exclude_embeddings=True)` counts them; a tied output head shares its table and
    is not counted twice. Cached: the count is fixed by the model."""
    count = getattr(self, "_non_embedding_parameters", None)
    if count is None:
        leaves = jax.tree_util.tree_leaves_with_path(self.model.abstract_params())
        embedding = lambda path: bool(path) and getattr(path[-1], "key", None) == "embedding"
        count = int(sum(math.prod(leaf.shape) for path, leaf in leaves if not embedding(path)))
        self._non_embedding_parameters = count
    return count


def floating_point_ops(self: Any, inputs: Mapping[str, Any]) -> int:
    """HF's estimate of a batch's training FLOPs: 6 x non-embedding parameters x input tokens
    (padding included). HF adds it to `state.total_flos` for every batch; so does jtrain (from
    the step's token count), so `total_flos` means the same number on both sides. The compiled
    step's exact count is `train_flops_per_step`, which MFU uses."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if ids is None:
        return 0
    return 6 * non_embedding_parameter_count(self) * int(np.size(ids))


def get_decay_parameter_names(self: Any, model: Any = None) -> list[str]:
    """Dotted jtrain names (`model.layers_0.self_attn.q_proj.kernel`) of the parameters weight decay
    applies to: HF's rule (`jtrain.optim.decay_mask`), for `model` (default: the Trainer's)."""
    from jtrain.optim.decay_mask import decays
    from jtrain.optim.paths import named_leaves

    model = self.model if model is None else model
    return [name for name, _ in named_leaves(model.abstract_params()) if decays(name)]


def _mesh_axis(self: Any, axis: str) -> int:
    return int(dict(self.mesh.shape).get(axis, 1))


def get_tp_size(self: Any) -> int:
    """Tensor-parallel size: the mesh's `tensor` axis."""
    return _mesh_axis(self, "tensor")


def get_cp_size(self: Any) -> int:
    """Context-parallel size: the mesh's `sequence` axis (it splits each row's positions, keys and
    values gathered for attention)."""
    return _mesh_axis(self, "sequence")


def get_sp_size(self: Any) -> int:
    """Ulysses-style sequence parallelism (an all-to-all between heads and positions) jtrain does
    not have: 1. Its sequence axis is context parallelism (`get_cp_size`)."""
    return 1


def get_learning_rates(self: Any) -> list[float]:
    """The learning rate of the next update, one per parameter group (jtrain has one group)."""
    if self.train_state is None or self.lr_scheduler is None:
        raise ConfigError("get_learning_rates() reads the optimizer's schedule, which exists once train() has "
                          "started (or after create_optimizer_and_scheduler and a setup)")
    from jtrain.train_loop import host_learning_rate

    step = int(self.train_state.step)
    exact = host_learning_rate(self, step)
    if exact is not None:
        return [exact]
    schedule = self.lr_scheduler
    return [(float(schedule(step)) if callable(schedule) else float(schedule)) * float(self.train_state.lr_factor)]


def get_total_train_batch_size(self: Any, args: Any = None) -> int:
    """Rows per optimizer update: per-device batch x accumulation x data-parallel size."""
    from jtrain.sharding import data_parallel_size

    args = args or self.args
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * data_parallel_size(self.mesh)


def num_examples(self: Any, loader: Any) -> int:
    """Rows in a loader's dataset (HF's `num_examples(dataloader)`)."""
    return len(loader.dataset)
