"""Setting a `Trainer` up: optimizer and schedule, compiled steps, the memory plan and the sharded
state, built once per Trainer, for training or (before any train()) for evaluation only.

Bound onto `jtrain.Trainer` as `_setup`, `_setup_for_evaluation`, `_drop_evaluation_setup` and
`_start_new_run`, so the Trainer module keeps to HF's surface while this one owns what the first
step needs.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import optax

from jtrain import trainer_checks
from jtrain.compiled import CompiledSteps, build_compiled_steps
from jtrain.data.loader import HostLoader
from jtrain.models.base import Model
from jtrain.sharding import data_parallel_size, sharding_rules

logger = logging.getLogger(__name__)


def setup(self: Any, num_training_steps: int, train_loader: HostLoader | None = None) -> None:
    """Optimizer, schedule, compiled steps, memory plan and sharded state (once per Trainer).

    With `train_loader`, the train step is compiled on abstract inputs before any state is
    allocated; a step that does not fit the device is refused, or with `auto_find_batch_size`
    the per-device batch shrinks (then `self.args` holds the batch used, as in HF, and the
    schedule is rebuilt for the new number of updates). See jtrain.memory. Without it (an
    evaluation before any train()), `self._evaluation_setup` is set. `self._built_here` remembers
    which of the schedule and optimizer were built here, for `drop_evaluation_setup` and
    `start_new_run`.
    """
    if self.steps is not None:
        return
    from jtrain.compiled import use_compilation_cache
    from jtrain.memory import (longest_batch, plan_train_step, remat_policy_from_args, tracker_for,
                               with_gradient_checkpointing)
    from jtrain.precision import policy_from_args

    a, tracker = self.args, tracker_for(self)
    tracker.start("init")
    try:
        use_compilation_cache(a.compilation_cache_dir)
        own = self.lr_scheduler is None, self.optimizer is None  # (schedule, optimizer) built here
        self.create_optimizer_and_scheduler(num_training_steps)
        trainer_checks.check_optimizer_pair(self.optimizer, self.lr_scheduler, "create_optimizer_and_scheduler")
        model = with_gradient_checkpointing(_training_model(self), remat_policy_from_args(
            a.gradient_checkpointing, a.gradient_checkpointing_kwargs))
        precision = policy_from_args(a)

        def build() -> CompiledSteps:
            return build_compiled_steps(model, self.mesh, self.optimizer, self.lr_scheduler, self.compute_loss,
                                        seed=a.seed, prediction_fn=self.prediction_step,
                                        rules=sharding_rules(a.fsdp), precision=precision,
                                        expected_train_compiles=len(a.length_buckets or ()) or 1,
                                        label_names=_label_names(a))

        self.steps, self._step_plan = build(), None
        self._built_here, self._evaluation_setup = own, train_loader is None
        if train_loader is not None:
            first = train_loader.shape_probe()
            trainer_checks.batch_check(self, "train_dataset")(first)
            trainer_checks.check_train_labels(self, first)
            plan = plan_train_step(self.steps, first, a.per_device_train_batch_size, data_parallel_size(self.mesh),
                                   budget=a.max_device_memory_bytes, auto_find=a.auto_find_batch_size,
                                   longest=longest_batch(first, _longest_padded_length(self)))
            if plan.per_device_batch != a.per_device_train_batch_size:
                self.args = a = a.replace(per_device_train_batch_size=plan.per_device_batch)
                _forget_own_optimizer(self, *own)
                self.create_optimizer_and_scheduler(self._update_plan().max_steps)
                self.steps = build()
                rows = plan.per_device_batch * data_parallel_size(self.mesh)
                plan.compiled = self.steps.compile_train(self.steps.abstract_train_batch(first, rows=rows))
            self._step_plan = plan
            tracker.note_estimate("train", plan.estimate)
        self.train_state = self.steps.init_state(self._initial_params)
        if self._carried_opt_state is not None:
            self.train_state = self.train_state.replace(
                opt_state=carried_optimizer_state(self.train_state.opt_state, self._carried_opt_state))
    except BaseException:
        self.steps = None  # nothing half-built stays behind; the next call starts over
        tracker.stop("init")
        raise
    self._initial_params = self._carried_opt_state = None
    self._init_memory_metrics = tracker.stop("init")


def setup_for_evaluation(self: Any) -> None:
    """The state evaluate(), predict() and save_model() need before any train(): the number of
    updates is a placeholder (`max_steps`, or 1 under epochs); train() rebuilds what depends on it."""
    if self.steps is None:
        setup(self, max(1, self.args.max_steps))


def drop_evaluation_setup(self: Any) -> None:
    """Called by train() after an evaluation-only set-up (a schedule one update long under
    num_train_epochs, no memory plan): keep the parameters, rebuild the rest for the run train()
    starts; an optimizer or schedule the user passed in stays theirs."""
    if self.steps is not None and self._evaluation_setup:
        _keep_only_params(self)


def start_new_run(self: Any) -> None:
    """train() called again after a train() (no model_init, no resume): as HF's, a new run on the
    trained weights, with a fresh TrainerState and a schedule built for this run's updates (the
    arguments may have changed since). The optimizer keeps its state (Adam's moments and step
    count), as HF keeps its torch optimizer, while the schedule starts over (`carried_optimizer_state`)."""
    from jtrain.trainer_helpers import fresh_trainer_state

    if self.steps is not None:
        self._carried_opt_state = self.train_state.opt_state
        _keep_only_params(self)
    fresh_trainer_state(self)


def carried_optimizer_state(fresh: Any, previous: Any) -> Any:
    """The previous run's optimizer state in the new run, as HF's second train() keeps its torch
    optimizer: every leaf carries over (placed as the new state's) except the schedule's step
    counts (`optax.ScaleByScheduleState`), which restart with HF's new scheduler. An optimizer
    whose state has another structure (the arguments changed `optim`) starts fresh, with a warning.
    Until it returns, both states exist: the set-up of a second run briefly needs one more
    optimizer state's memory than the first's."""
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
    kind = lambda x: (np.shape(x), getattr(x, "dtype", None))  # noqa: E731
    same = jax.tree.structure(fresh) == jax.tree.structure(previous) and all(
        kind(a) == kind(b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(previous)))
    if not same:
        logger.warning("train(): the optimizer differs from the previous run's, so its state starts fresh")
        return fresh

    def carry(new: Any, old: Any) -> Any:
        if is_schedule(new):
            return new
        return jax.device_put(old, new.sharding) if isinstance(new, jax.Array) else old

    return jax.tree.map(carry, fresh, previous, is_leaf=is_schedule)


def _keep_only_params(self: Any) -> None:
    """Drop what `setup` built except the parameters (frozen and quantised parts included), so the
    next `setup` rebuilds the schedule and optimizer it built, the compiled steps and the state."""
    self._initial_params = self.train_state.full_params()
    _forget_own_optimizer(self, *self._built_here)
    self.steps = self.train_state = self._step_plan = None
    self._evaluation_setup = False


def _forget_own_optimizer(self: Any, own_schedule: bool, own_optimizer: bool) -> None:
    """Drop the schedule and optimizer `setup` built (not the user's), so they are built again."""
    if own_schedule:
        self.lr_scheduler = self.lr_controller = None
    if own_optimizer:
        self.optimizer = None


def _label_names(args: Any) -> tuple[str, ...]:
    """HF's `label_names`: the batch keys a loss needs (every jtrain model's is `labels`)."""
    return tuple(args.label_names) if args.label_names is not None else ("labels",)


def _longest_padded_length(self: Any) -> int | None:
    """The longest length training batches can be padded to, when they take several (length
    buckets of the collator or of `args.length_buckets`); None when every batch has one shape."""
    buckets = getattr(self.data_collator, "length_buckets", None) or self.args.length_buckets
    return max(int(b) for b in buckets) if buckets else None


def _training_model(self: Any) -> Model:
    """The model the compiled steps run: `self.model` plus training-only transforms (NEFTune)."""
    if self.args.neftune_noise_alpha:
        from jtrain.neftune import NEFTuneModel

        return NEFTuneModel.wrap(self.model, self.args.neftune_noise_alpha)
    return self.model


def kernel_layout(model: Any) -> Any:
    """The model's kernels as HF's weights (`optim.targets.kernel_layout`), which GaLore/APOLLO select and
    project, and Adafactor and Muon see as matrices, as HF does; None for a user's own model or one under
    wrappers, whose params are not named as HF's."""
    from jtrain.models.hub import model_leaf_maps
    from jtrain.models.wrapper import has_hf_format
    from jtrain.optim.targets import kernel_layout as from_maps

    if not has_hf_format(model) or hasattr(model, "inner"):
        return None
    return from_maps(model_leaf_maps(model))
