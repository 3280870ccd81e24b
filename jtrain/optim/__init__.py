"""Optimizers for jtrain: HF `TrainingArguments.optim` names as optax chains.

Example:
    >>> from jtrain.optim import make_optimizer
    >>> opt = make_optimizer("adamw_torch", 3e-4, weight_decay=0.01, max_grad_norm=1.0)
"""
from jtrain.optim.decay_mask import decay_mask
from jtrain.optim.factory import OPTIMIZER_NAMES, make_optimizer
from jtrain.optim.schedule_free import schedule_free_eval_params

__all__ = [
    "OPTIMIZER_NAMES",
    "decay_mask",
    "make_optimizer",
    "schedule_free_eval_params",
]
