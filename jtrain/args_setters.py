"""HF's grouped setters of `TrainingArguments` (`set_training`, `set_evaluate`, ...) and its small
derived helpers (`get_warmup_steps`, `train_batch_size`, `to_json_string`, `to_sanitized_dict`).

Why a mixin of its own: the field list in `jtrain.args` stays readable. One difference from HF,
because jtrain's arguments are frozen data: a setter returns a new `TrainingArguments` instead of
changing this one, so write `args = args.set_training(...)`, as HF's own examples do. Every new
instance is validated like one built directly. Arguments that only steer torch's DataLoader
(`pin_memory`, `persistent_workers`, `multiprocessing_context`, `in_order`) are accepted with HF's
defaults and have no effect, as in the HF-style scripts.
"""

from __future__ import annotations

import json
from typing import Any

from jtrain.errors import ConfigError
from jtrain.hf_only_args import NO_UPLOAD


class TrainingArgumentsSetters:
    """Mixed into `jtrain.args.TrainingArguments` (which provides `replace`, `warmup_for`, `to_dict`);
    each setter returns `self.replace(...)`."""

    # ---- derived values --------------------------------------------------------------------
    def get_warmup_steps(self, num_training_steps: int) -> int:
        """HF's name for the warmup of a run of `num_training_steps` updates (a ratio rounds up)."""
        return self.warmup_for(num_training_steps)

    @property
    def train_batch_size(self) -> int:
        """Rows per micro-batch of this process: per-device size x this process's data-parallel
        devices (HF: per-device x GPUs of the process). Model-parallel mesh axes hold no extra rows."""
        return self.per_device_train_batch_size * _local_data_parallel(self)

    @property
    def eval_batch_size(self) -> int:
        """Rows per evaluation batch of this process (see `train_batch_size`)."""
        return self.per_device_eval_batch_size * _local_data_parallel(self)

    def to_json_string(self) -> str:
        """The arguments as indented JSON (HF's `to_json_string`)."""
        return json.dumps(self.to_dict(), indent=2)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """The arguments plus the two batch sizes, every value a bool/int/float/str (TensorBoard's
        hparams take nothing else), as HF's."""
        d = {**self.to_dict(), "train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size}
        return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in d.items()}

    # ---- HF's grouped setters --------------------------------------------------------------
    def set_training(self, learning_rate: float = 5e-5, batch_size: int = 8, weight_decay: float = 0,
                     num_epochs: float = 3, max_steps: int = -1, gradient_accumulation_steps: int = 1, seed: int = 42,
                     activation_checkpointing: bool = False, gradient_checkpointing: bool | None = None) -> Any:
        """Training hyperparameters (and `do_train`); returns the new arguments."""
        checkpointing = activation_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        return self.replace(do_train=True, learning_rate=learning_rate, per_device_train_batch_size=batch_size,
                            weight_decay=weight_decay, num_train_epochs=num_epochs, max_steps=max_steps,
                            gradient_accumulation_steps=gradient_accumulation_steps, seed=seed,
                            activation_checkpointing=checkpointing)

    def set_evaluate(self, strategy: str = "no", steps: int = 500, batch_size: int = 8,
                     accumulation_steps: int | None = None, delay: float | None = None,
                     loss_only: bool = False) -> Any:
        """Evaluation during training (`do_eval` follows the strategy); returns the new arguments."""
        _positive_steps(strategy, steps)
        return self.replace(eval_strategy=strategy, do_eval=strategy != "no", eval_steps=steps,
                            per_device_eval_batch_size=batch_size, eval_accumulation_steps=accumulation_steps,
                            eval_delay=0.0 if delay is None else delay, prediction_loss_only=loss_only)

    def set_testing(self, batch_size: int = 8, loss_only: bool = False) -> Any:
        """Prediction on the test split (`do_predict`); returns the new arguments."""
        return self.replace(do_predict=True, per_device_eval_batch_size=batch_size, prediction_loss_only=loss_only)

    def set_save(self, strategy: str = "steps", steps: int = 500, total_limit: int | None = None,
                 on_each_node: bool = False) -> Any:
        """Checkpointing; returns the new arguments."""
        _positive_steps(strategy, steps)
        return self.replace(save_strategy=strategy, save_steps=steps, save_total_limit=total_limit,
                            save_on_each_node=on_each_node)

    def set_logging(self, strategy: str = "steps", steps: int = 500, report_to: str | list[str] = "none",
                    level: str = "passive", first_step: bool = False, nan_inf_filter: bool = False,
                    on_each_node: bool = False, replica_level: str = "passive") -> Any:
        """Logging; returns the new arguments (HF's defaults here differ from the fields' own, as in HF)."""
        _positive_steps(strategy, steps)
        return self.replace(logging_strategy=strategy, logging_steps=steps,
                            report_to=[report_to] if isinstance(report_to, str) else list(report_to),
                            log_level=level, logging_first_step=first_step, logging_nan_inf_filter=nan_inf_filter,
                            log_on_each_node=on_each_node, log_level_replica=replica_level)

    def set_optimizer(self, name: str = "adamw_torch", learning_rate: float = 5e-5, weight_decay: float = 0,
                      beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8, args: str | None = None) -> Any:
        """The optimizer (HF's names) and its hyperparameters; returns the new arguments."""
        return self.replace(optim=name, learning_rate=learning_rate, weight_decay=weight_decay, adam_beta1=beta1,
                            adam_beta2=beta2, adam_epsilon=epsilon, optim_args=args)

    def set_lr_scheduler(self, name: str = "linear", num_epochs: float = 3.0, max_steps: int = -1,
                         warmup_steps: float = 0) -> Any:
        """The learning-rate schedule and run length; returns the new arguments."""
        return self.replace(lr_scheduler_type=name, num_train_epochs=num_epochs, max_steps=max_steps,
                            warmup_steps=warmup_steps)

    def set_dataloader(self, train_batch_size: int = 8, eval_batch_size: int = 8, drop_last: bool = False,
                       num_workers: int = 0, pin_memory: bool = True, persistent_workers: bool = False,
                       prefetch_factor: int | None = None, multiprocessing_context: str | None = None,
                       in_order: bool = True, auto_find_batch_size: bool = False, ignore_data_skip: bool = False,
                       sampler_seed: int | None = None) -> Any:
        """Batching and loading; returns the new arguments (torch DataLoader-only options have no effect)."""
        return self.replace(per_device_train_batch_size=train_batch_size, per_device_eval_batch_size=eval_batch_size,
                            dataloader_drop_last=drop_last, dataloader_num_workers=num_workers,
                            dataloader_prefetch_factor=prefetch_factor, auto_find_batch_size=auto_find_batch_size,
                            ignore_data_skip=ignore_data_skip, data_seed=sampler_seed)

    def set_push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: jtrain never uploads (its output directories are what push_to_hub would upload)."""
        raise ConfigError(f"set_push_to_hub: {NO_UPLOAD}")


def _positive_steps(strategy: str, steps: int) -> None:
    if strategy == "steps" and steps == 0:
        raise ConfigError("strategy 'steps' needs a positive `steps`")


def _local_data_parallel(args: Any) -> int:
    """This process's share of the data-parallel devices of the mesh `args` describes."""
    import jax

    from jtrain.sharding import BATCH_AXES, resolve_mesh_shape

    shape = resolve_mesh_shape(args.mesh_shape, args.fsdp, jax.device_count())
    data_parallel = 1
    for axis in BATCH_AXES:
        data_parallel *= int(shape.get(axis, 1))
    return max(1, data_parallel // jax.process_count())
