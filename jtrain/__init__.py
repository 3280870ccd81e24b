"""jtrain: the Hugging Face `Trainer` API, rebuilt functionally on JAX/Flax.

Public API (HF names where HF has one)::

    from jtrain import Trainer, TrainingArguments, make_train_step, make_eval_step
"""

from jtrain.args import TrainingArguments
from jtrain.callbacks import (CallbackHandler, DefaultFlowCallback, EarlyStoppingCallback, TrainerCallback,
                              TrainerControl, TrainerState)
from jtrain.errors import CheckpointError, ConfigError, DataError, JtrainError, NonFiniteError
from jtrain.evaluation import EvalPrediction
from jtrain.losses import LossOutput, causal_lm_loss, masked_lm_loss, sequence_classification_loss
from jtrain.models import Model, create_model
from jtrain.reporting import PrinterCallback, ProgressCallback
from jtrain.schedules import make_schedule
from jtrain.state import TrainState
from jtrain.step import accumulate_gradients, make_eval_step, make_train_step
from jtrain.trainer import PredictionOutput, Trainer, TrainOutput
from jtrain.version import __version__

__all__ = [
    "TrainingArguments", "Trainer", "TrainOutput", "PredictionOutput", "EvalPrediction",
    "TrainerCallback", "TrainerState", "TrainerControl", "CallbackHandler", "DefaultFlowCallback",
    "EarlyStoppingCallback", "ProgressCallback", "PrinterCallback", "TrainState", "make_train_step",
    "make_eval_step", "accumulate_gradients", "make_schedule", "LossOutput", "causal_lm_loss",
    "masked_lm_loss", "sequence_classification_loss", "Model", "create_model", "JtrainError",
    "ConfigError", "DataError", "CheckpointError", "NonFiniteError", "__version__",
]
