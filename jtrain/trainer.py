"""`Trainer`: HF's Trainer API over one compiled, sharded train step.

The host loop dispatches update N, then reads update N-1's metrics (one transfer), so the
device never waits on Python for logging. Callbacks run on the host between compiled steps.
Events HF fires inside a step (`on_substep_end`, `on_pre_optimizer_step`,
`on_optimizer_step`) fire on the host one update late, with that update's reported metrics
(`metrics=` and `step=` in kwargs); `on_step_end` fires right after dispatch and decides
logging, evaluation and saving, which depend only on the step count.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Mapping, NamedTuple

import jax

from jtrain import hp_search, model_card, trainer_checks, trainer_helpers, trainer_resume, trainer_setup
from jtrain.accounting import StepPlan, plan_steps
from jtrain.args import TrainingArguments
from jtrain.callbacks import CallbackHandler, DefaultFlowCallback, TrainerCallback, TrainerControl, TrainerState
from jtrain.compiled import CompiledSteps
from jtrain.data.loader import ArrayDataset, HostLoader, LoaderPosition
from jtrain.errors import ConfigError
from jtrain.hf_only_args import NO_UPLOAD
from jtrain.evaluation import EvalLoopOutput, evaluation_loop
from jtrain.losses import LOSSES_BY_TASK, LossOutput, compute_loss_func_adapter
from jtrain.models.base import Model
from jtrain.models.wrapper import hf_exportable
from jtrain.optim import make_optimizer
from jtrain.optim.factory import LAYOUT_OPTIMIZERS, make_optimizer_from_factory
from jtrain.reporting import PrinterCallback, ProgressCallback, callbacks_for_report_to
from jtrain.schedules import make_lr_controller, make_schedule
from jtrain.sharding import data_parallel_size, make_mesh, resolve_mesh_shape
from jtrain.xla_flags import apply_backend_choices

logger = logging.getLogger(__name__)


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict


class PredictionOutput(NamedTuple):
    predictions: Any
    label_ids: Any
    metrics: dict


class Trainer:
    """HF-compatible trainer. Example::

        trainer = Trainer(model, TrainingArguments(output_dir="out", max_steps=100),
                          train_dataset=train_rows, eval_dataset=eval_rows)
        trainer.train()
        print(trainer.evaluate()["eval_loss"])
    """

    # HF's helper methods (jtrain.trainer_helpers, jtrain.hp_search, jtrain.model_card), bound as HF
    # binds its own.
    metrics_format = staticmethod(trainer_helpers.metrics_format)
    log_metrics = trainer_helpers.log_metrics
    save_metrics = trainer_helpers.save_metrics
    save_state = trainer_helpers.save_state
    get_num_trainable_parameters = trainer_helpers.get_num_trainable_parameters
    get_learning_rates = trainer_helpers.get_learning_rates
    get_total_train_batch_size = trainer_helpers.get_total_train_batch_size
    num_examples = trainer_helpers.num_examples
    call_model_init = trainer_helpers.call_model_init
    log = trainer_helpers.log
    floating_point_ops = trainer_helpers.floating_point_ops
    get_decay_parameter_names = trainer_helpers.get_decay_parameter_names
    get_tp_size, get_cp_size, get_sp_size = (trainer_helpers.get_tp_size, trainer_helpers.get_cp_size,
                                             trainer_helpers.get_sp_size)
    hyperparameter_search = hp_search.hyperparameter_search
    create_model_card = model_card.create_model_card
    # jtrain's own parts: resuming from a checkpoint (jtrain.trainer_resume), and the check the host
    # loop runs on every update's metrics (jtrain.trainer_checks).
    _resume, _restore_from = trainer_resume.resume, trainer_resume.restore_from
    # Setting up optimizer, compiled steps, memory plan and state (jtrain.trainer_setup).
    _setup, _setup_for_evaluation = trainer_setup.setup, trainer_setup.setup_for_evaluation
    _drop_evaluation_setup, _start_new_run = trainer_setup.drop_evaluation_setup, trainer_setup.start_new_run
    _load_callback_state = trainer_resume.load_callback_state
    _check_finite = trainer_checks.check_finite

    def __init__(
        self,
        model: Model | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[..., Any] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[Callable, dict] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        params: Any = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """HF's arguments, in HF's order, plus jtrain's keyword-only `params` (initial weights, e.g.
        from `from_pretrained`; default: initialised from `args.seed`) and `mesh`.

        `model_init()` (or `model_init(trial)` under `hyperparameter_search`) returns a Model or a
        `(Model, params)` pair; it replaces `model`, as in HF. `optimizer_cls_and_kwargs` is an
        optax factory and its kwargs (`(optax.lion, {"b1": 0.95})`), called with the Trainer's
        learning-rate schedule.
        """
        self._init_arguments = {k: v for k, v in locals().items() if k != "self"}  # hyperparameter_search rebuilds
        self.model_init = model_init
        if model_init is not None:
            if model is not None:
                logger.warning("Trainer got both `model` and `model_init`; the model from model_init is used, as in HF")
            model, params = self.call_model_init(None, params)
        elif model is None:
            raise ConfigError("Trainer needs a `model` (a jtrain Model, e.g. from jtrain.models.from_pretrained) "
                              "or a `model_init` function that returns one")
        trainer_checks.check_model(model)
        trainer_checks.check_overrides(self, Trainer)
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.args = _jtrain_arguments(args)
        self.model, self.data_collator, self.processing_class = model, data_collator, processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        trainer_checks.check_datasets(self)
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, preprocess_logits_for_metrics
        trainer_checks.check_compute_metrics(self)
        self.compute_loss_func = compute_loss_func
        self.optimizer, self.lr_scheduler = optimizers
        trainer_checks.check_optimizer_arguments(self)
        apply_backend_choices(self.args.use_cpu, self.args.full_determinism)
        self.mesh = mesh or make_mesh(resolve_mesh_shape(self.args.mesh_shape, self.args.fsdp, jax.device_count()))
        self._initial_params = params
        trainer_checks.check_process_roles(self)
        if self.args.process_log_level_name != "passive":
            logging.getLogger("jtrain").setLevel(self.args.get_process_log_level())  # as HF sets its own logger's
        self.train_state: Any = None  # jtrain.state.TrainState once set up
        self.steps: CompiledSteps | None = None
        self._evaluation_setup = False  # set up by evaluate()/predict()/save_model() before train(): trainer_setup
        self._built_here = (False, False)  # (schedule, optimizer) built by the set-up, not passed in
        self._train_calls = 0
        self._carried_opt_state = None  # a second train()'s optimizer state, until its setup (trainer_setup)
        self.lr_controller = None
        default = [DefaultFlowCallback, PrinterCallback if self.args.disable_tqdm else ProgressCallback]
        reporters = (callbacks_for_report_to(self.args.report_to, self.args.resolved_logging_dir)
                     if self.is_world_process_zero() else [])
        self.callback_handler = CallbackHandler(default + reporters + list(callbacks or []), model,
                                                processing_class, None, None)
        self.state = TrainerState(is_local_process_zero=self.is_local_process_zero(),
                                  is_world_process_zero=self.is_world_process_zero())
        self.control = TrainerControl()
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # ---- HF override points -----------------------------------------------------------
    def compute_loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> LossOutput:
        """Summed loss and its weight for one micro-batch; traced into the compiled step."""
        if self.compute_loss_func is not None:  # jtrain's (outputs, batch) or HF's (outputs, labels, num_items)
            return compute_loss_func_adapter(self.compute_loss_func, self.model.task)(outputs, batch)
        loss = LOSSES_BY_TASK[self.model.task]
        extra = ({"problem_type": getattr(self.model.config, "problem_type", None)}
                 if self.model.task == "sequence_classification" else {})
        return loss(outputs, batch, label_smoothing=self.args.label_smoothing_factor, **extra)

    def prediction_step(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> Any:
        """What evaluate/predict keep of one batch (the logits, through preprocess_logits_for_metrics);
        traced into the compiled predict step: any pytree of arrays whose leading axis is the row."""
        logits = outputs["logits"]
        if self.preprocess_logits_for_metrics is not None:
            return self.preprocess_logits_for_metrics(logits, batch.get("labels"))
        return logits

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Callable:
        self._num_training_steps = num_training_steps  # for a warm-up given as a ratio (create_optimizer)
        if self.lr_scheduler is None:
            a = self.args
            self.lr_scheduler = make_schedule(
                a.lr_scheduler_type, learning_rate=a.learning_rate, num_training_steps=num_training_steps,
                num_warmup_steps=a.warmup_for(num_training_steps), scheduler_kwargs=a.lr_scheduler_kwargs)
            self.lr_controller = make_lr_controller(a.lr_scheduler_type, learning_rate=a.learning_rate,
                                                    scheduler_kwargs=a.lr_scheduler_kwargs)
        return self.lr_scheduler

    def create_optimizer(self) -> Any:
        if self.optimizer is None and self.optimizer_cls_and_kwargs is not None:
            factory, kwargs = self.optimizer_cls_and_kwargs
            a = self.args
            try:
                self.optimizer = make_optimizer_from_factory(factory, kwargs, self.lr_scheduler,
                                                             weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm)
            except ValueError as err:
                raise ConfigError(str(err)) from err
        if self.optimizer is None:
            a = self.args
            self.optimizer = make_optimizer(
                a.optim, self.lr_scheduler, weight_decay=a.weight_decay, adam_beta1=a.adam_beta1,
                adam_beta2=a.adam_beta2, adam_epsilon=a.adam_epsilon, max_grad_norm=a.max_grad_norm,
                optim_args=a.optim_args, optim_target_modules=a.optim_target_modules,
                warmup_steps=self._optimizer_warmup(), peak_learning_rate=a.learning_rate,
                param_layout=trainer_setup.kernel_layout(self.model) if a.optim in LAYOUT_OPTIMIZERS else None)
        return self.optimizer

    def _optimizer_warmup(self) -> int:
        """TrainingArguments' warm-up in updates, which HF also hands to the schedule-free optimizers
        (a ratio resolved against the run's updates once the schedule knows them)."""
        return self.args.warmup_for(getattr(self, "_num_training_steps", 0))  # a ratio of no known run: 0

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_scheduler(num_training_steps)
        self.create_optimizer()

    # ---- process roles ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """Only reached for a missing attribute: HF's that jtrain has no counterpart for say why."""
        reason = trainer_checks.HF_ONLY_ATTRIBUTES.get(name)
        if reason is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise AttributeError(f"Trainer.{name} is part of HF's torch Trainer that jtrain does not have: {reason}")

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as TrainingArguments(push_to_hub=True) is: jtrain never uploads."""
        raise ConfigError(f"Trainer.push_to_hub: {NO_UPLOAD}")

    def is_world_process_zero(self) -> bool:
        """Process 0 of the job: the one that writes the output files and the loggers' records."""
        return self.args.process_index == 0

    def is_local_process_zero(self) -> bool:
        """The first process on this host (every process of a one-process-per-host job), as HF's."""
        return self.args.local_process_index == 0

    def add_callback(self, callback: Any) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: Any) -> Any:
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        self.callback_handler.remove_callback(callback)

    # ---- set-up ---------------------------------------------------------------------------
    def _collate(self) -> Callable | None:
        """The collator: `data_collator`, else HF's default (see `jtrain.data.trainer_loader.default_collator`)."""
        if self.data_collator is not None:
            return self.data_collator
        from jtrain.data.trainer_loader import default_collator

        return default_collator(self.processing_class, self.args.length_buckets)

    def _loader(self, dataset: Any, *, train: bool, accum: int | None, batch_rows: int) -> HostLoader:
        """HF's data arguments applied to `dataset` (rows, `datasets` objects, or a training stream)."""
        from jtrain.data.trainer_loader import make_loader

        return make_loader(dataset, self.args, collate=self._collate(), model_inputs=self.model.input_names,
                           train=train, accum=accum, batch_rows=batch_rows,
                           what="train_dataset" if train else "eval_dataset")

    def _train_rows(self) -> int | None:
        """Rows in the training set (None for a stream of unknown length)."""
        from jtrain.data.sources import num_rows

        return num_rows(self.train_dataset)

    def _per_device_train_batch_size(self) -> int:
        """Rows per device per micro-batch."""
        return self.args.per_device_train_batch_size

    def _update_plan(self) -> StepPlan:
        if self.train_dataset is None:
            raise ConfigError("Trainer.train() needs a `train_dataset`")
        a = self.args
        return plan_steps(per_device_batch=self._per_device_train_batch_size(),
                          data_parallel=data_parallel_size(self.mesh),
                          accum=a.gradient_accumulation_steps, num_rows=self._train_rows(),
                          max_steps=a.max_steps, num_train_epochs=a.num_train_epochs, drop_last=a.dataloader_drop_last)

    def _plan(self) -> tuple[HostLoader, StepPlan]:
        """The update plan and the train loader, through `get_train_dataloader` (a subclass may override it)."""
        plan = self._update_plan()
        return trainer_checks.checked_loader(self.get_train_dataloader(), "get_train_dataloader"), plan

    # ---- HF's dataloader getters: what train/evaluate/predict iterate (override points, as in HF) ----
    def get_train_dataloader(self) -> HostLoader:
        """The training batches: global batches shaped [accumulation, rows, ...], host arrays when
        iterated directly (`next(iter(trainer.get_train_dataloader()))` shows one)."""
        a = self.args
        return self._loader(self.train_dataset, train=True, accum=a.gradient_accumulation_steps,
                            batch_rows=self._update_plan().global_batch_size)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> HostLoader:
        """The evaluation batches of `eval_dataset` (default: the Trainer's), in order, none dropped."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None:
            raise ConfigError("get_eval_dataloader() needs an `eval_dataset`")
        return self._loader(dataset, train=False, accum=None,
                            batch_rows=self.args.per_device_eval_batch_size * data_parallel_size(self.mesh))

    def get_test_dataloader(self, test_dataset: Any) -> HostLoader:
        """The prediction batches of `test_dataset` (evaluation batch size, in order)."""
        return self.get_eval_dataloader(test_dataset)

    # ---- training -------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None) -> TrainOutput:
        """Train for `max_steps` (or epochs); resume from a checkpoint path or, with True, the latest.

        As in HF, `trial` (a dict, or an optuna trial) is recorded as `state.trial_params` (the search
        itself applies a trial's values: `hyperparameter_search`), and `ignore_keys_for_eval` is the
        `ignore_keys` of the evaluations during training. With `model_init`, every call trains a fresh
        model from `model_init(trial)`, as HF's does (a second train() does not continue the first).
        Without it, a train() after a train() starts a new run on the trained weights, as HF's: a fresh
        TrainerState, schedule and optimizer state (see `trainer_setup.start_new_run`)."""
        from jtrain.memory import tracker_for
        from jtrain.train_loop import run_training

        if resume_from_checkpoint is None and self.args.resume_from_checkpoint:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        if trial is not None:
            self._trial_params = dict(trial) if isinstance(trial, Mapping) else dict(getattr(trial, "params", {}))
        if self.model_init is not None and (trial is not None or self.steps is not None):
            # HF re-creates the model at every train(); the one built at construction is still unused
            # (nothing compiled, no state) when this is the first call without a trial, so it stays.
            trainer_helpers.reinit_from_model_init(self, trial)
        elif self._train_calls and not resume_from_checkpoint:
            self._start_new_run()
        self._ignore_keys_for_eval = ignore_keys_for_eval

        requested = self._per_device_train_batch_size()
        loader, plan = self._plan()
        self._drop_evaluation_setup()  # an evaluate()/predict()/save_model() before this train() set up a placeholder
        self._setup(plan.max_steps, train_loader=loader)
        if self._per_device_train_batch_size() != requested:
            loader, plan = self._plan()  # auto_find_batch_size chose a smaller per-device batch
        loader.place = trainer_checks.checked_placement(self.steps.place_train_batch,
                                                        trainer_checks.batch_check(self, "train_dataset"))
        tracker_for(self).start("train")
        position = LoaderPosition()
        if resume_from_checkpoint:
            position = self._resume(resume_from_checkpoint)
        return run_training(self, loader, plan, position)

    # ---- evaluation and prediction ----------------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict:
        """Loss (and accuracy, perplexity for LMs) reduced on the device; HF's speed keys.

        `ignore_keys` are model-output keys left out of the predictions, as in HF; jtrain's models
        output only `logits`, so ignoring it leaves no predictions (and compute_metrics uncalled)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None:
            raise ConfigError("evaluate() needs an `eval_dataset`")
        if isinstance(dataset, Mapping) and not isinstance(dataset, ArrayDataset):
            metrics = {}
            for name, ds in dataset.items():
                metrics.update(self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        from jtrain.memory import eval_memory_metrics, tracker_for

        tracker_for(self).start(metric_key_prefix)
        want = self.compute_metrics is not None and trainer_checks.keeps_logits(ignore_keys)
        output = self._evaluation_loop(dataset, metric_key_prefix, want_predictions=want)
        self._derived_eval_keys = getattr(self, "_derived_eval_keys", frozenset()) | set(output.derived_keys)
        output.metrics.update(eval_memory_metrics(self, metric_key_prefix))
        self.log(output.metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=output.metrics)
        return output.metrics

    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        """Predictions (the logits, or what preprocess_logits_for_metrics makes of them; None when
        `ignore_keys` names `logits`), label ids and metrics, in dataset order."""
        output = self._evaluation_loop(test_dataset, metric_key_prefix,
                                       want_predictions=trainer_checks.keeps_logits(ignore_keys), predicting=True)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics=output.metrics)
        return PredictionOutput(output.predictions, output.label_ids, output.metrics)

    def _report_to_hp_search(self, metrics: dict) -> None:
        """Under `hyperparameter_search`, an evaluation during training reports to the trial (and
        its pruner may stop the training here); otherwise nothing."""
        reporter = getattr(self, "_hp_reporter", None)
        if reporter is not None:
            reporter(self, metrics)

    def _evaluation_loop(self, dataset: Any, prefix: str, want_predictions: bool,
                         predicting: bool = False) -> EvalLoopOutput:
        self._setup_for_evaluation()
        loader = (self.get_test_dataloader(dataset) if predicting else self.get_eval_dataloader(dataset))
        loader = trainer_checks.checked_loader(loader, "get_test_dataloader" if predicting else "get_eval_dataloader")
        what = "test_dataset" if predicting else "eval_dataset"
        loader.place = trainer_checks.checked_placement(self.steps.place_eval_batch,
                                                        trainer_checks.batch_check(self, what))
        return evaluation_loop(self, loader, prefix, want_predictions and not self.args.prediction_loss_only,
                               predicting)

    # ---- logging and saving -------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, *, max_shard_size: int | str = "5GB",
                   merged: bool = False) -> str:
        """Write the model in HF format (config.json + safetensors) that `transformers` loads, and the
        `processing_class` beside it as HF's does (a transformers tokenizer's `save_pretrained` files, or
        a `tokenizers.Tokenizer`'s tokenizer.json).

        Above `max_shard_size` the weights are split into `model-0000i-of-0000n.safetensors`
        with an index, as HF does. Every process calls this: with several hosts, each sharded
        parameter is gathered collectively, one at a time, and only process 0 writes.

        A LoRA model (`jtrain.peft`) writes only its adapters, in PEFT's layout
        (adapter_config.json + adapter_model.safetensors), as HF's Trainer does for a PeftModel;
        `merged=True` writes the base with the adapters folded in as a full HF model instead.
        A quantised base (`jtrain.quant.QuantizedModel`) is written dequantised, a QAT model with
        its float weights (HF format has no such quantisation; `jtrain.quant.save_quantized` and
        `export_quantized` write the quantised forms).
        """
        from jtrain.models import save_pretrained

        output_dir = output_dir or self.args.output_dir
        self._setup_for_evaluation()  # before train(): the initial weights (`params=`, else seeded), as HF writes them
        params = self.train_state.full_params()
        if hasattr(self.model, "lora_config"):  # a jtrain.peft.LoraModel (imported lazily)
            from jtrain.peft import save_adapter, save_merged

            if merged:
                save_merged(self.model, params, output_dir, max_shard_size=max_shard_size)
            else:
                save_adapter(self.model, params, output_dir)
        else:
            model, params = hf_exportable(self.model, params)
            save_pretrained(model, params, output_dir, max_shard_size=max_shard_size)
        tokenizer = self.processing_class
        if self.is_world_process_zero() and tokenizer is not None:
            if hasattr(tokenizer, "save_pretrained"):  # a transformers tokenizer or processor: its own files, as HF's
                tokenizer.save_pretrained(output_dir)
            elif hasattr(tokenizer, "save"):  # a `tokenizers.Tokenizer`, with the config AutoTokenizer reads
                from jtrain.data.local_tokenizers import save_tokenizer
                from jtrain.models.wrapper import innermost

                save_tokenizer(tokenizer, output_dir, getattr(innermost(self.model), "config", None))
        return output_dir

    def end(self) -> None:
        """HF's `end()`, for the very end of a script: close the loggers' files and, in a multi-process
        job, leave it (`jax.distributed.shutdown`) so the processes exit together. train, evaluate,
        predict and save_model communicate between processes, so nothing of them may follow."""
        for callback in self.callback_handler.callbacks:
            close = getattr(callback, "close", None)
            if callable(close):
                close()
        if jax.process_count() > 1 and jax.distributed.is_initialized():
            jax.distributed.shutdown()

    @property
    def params(self) -> Any:
        return None if self.train_state is None else self.train_state.full_params()

    def trainer_state_snapshot(self) -> TrainerState:
        """A copy for the checkpoint finaliser thread, which writes it after the loop moved on."""
        return copy.deepcopy(self.state)


def _jtrain_arguments(args: Any) -> TrainingArguments:
    """The Trainer's arguments: jtrain's, the defaults, or HF's own `transformers.TrainingArguments` read into
    jtrain's (the values it sets away from HF's defaults)."""
    if args is None:
        return TrainingArguments()
    if isinstance(args, TrainingArguments):
        return args
    if type(args).__name__ == "TrainingArguments" and type(args).__module__.startswith("transformers"):
        logger.info("Trainer: reading transformers.TrainingArguments into jtrain's (the same names and meaning)")
        return TrainingArguments.from_hf(args)
    raise ConfigError(f"Trainer: args must be a jtrain.TrainingArguments (or transformers'), got {type(args).__name__}")
