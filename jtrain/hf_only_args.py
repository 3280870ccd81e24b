"""HF `TrainingArguments` fields that configure PyTorch, accelerate, DeepSpeed or the Hub, and what
jtrain does with each.

Code ported from HF's Trainer passes them (`dataloader_pin_memory=False`, `push_to_hub=False`,
`ddp_find_unused_parameters=False`) and reads them back (`if training_args.push_to_hub: ...`).
jtrain's `TrainingArguments` accepts every one in Python and in a config's `training:` section and
reads it back as given (HF's default when not given). Most have no effect in JAX, and one warning
names those set away from HF's default; four ask for something jtrain does not do (upload,
DeepSpeed, accelerate's parallel layout, torch debug hooks) and are refused when switched on, with
what to use instead. A test keeps the table equal to the installed transformers' fields minus jtrain's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from jtrain.coerce import closest_key_hint, coerce
from jtrain.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HfOnly:
    """One HF field: its default (read back when not given), and why it has no effect, or, for a
    `refused` one, why a value that switches it on cannot be honoured and what to use instead."""

    default: Any
    reason: str
    refused: bool = False
    hint: Any = Any  # HF's type, for values from a config file or the command line (strings there)


_TORCH = ("a PyTorch/accelerate setting; jtrain compiles every step with XLA, shards it over `mesh_shape` and "
          "loads data on the host")
_UPLOAD = "a Hub upload setting; jtrain never uploads"
NO_UPLOAD = ("jtrain never uploads; upload `output_dir` after training (huggingface_hub's `upload_folder`), it "
             "holds what push_to_hub would push")
"""Why every Hub upload (the push_to_hub field, set_push_to_hub, Trainer.push_to_hub) is refused."""
_TRACKIO = "HF's trackio reporting; jtrain's `report_to` takes tensorboard, jsonl or none"


_TYPES: dict[str, Any] = {
    **dict.fromkeys(("ddp_broadcast_buffers", "ddp_find_unused_parameters", "ddp_static_graph"), bool | None),
    **dict.fromkeys(("ddp_bucket_cap_mb", "torch_empty_cache_steps"), int | None),
    **dict.fromkeys(("dataloader_in_order", "dataloader_persistent_workers", "dataloader_pin_memory",
                     "eval_use_gather_object", "torch_compile", "use_cache", "use_liger_kernel"), bool),
    **dict.fromkeys(("ddp_timeout", "local_rank"), int),
}


def _torch(**defaults: Any) -> dict[str, HfOnly]:
    return {name: HfOnly(default, _TORCH, hint=_TYPES.get(name, Any)) for name, default in defaults.items()}


HF_ONLY_FIELDS: dict[str, HfOnly] = {
    **_torch(accelerator_config=None, dataloader_in_order=True, dataloader_multiprocessing_context=None,
             dataloader_persistent_workers=False, dataloader_pin_memory=True, ddp_backend=None,
             ddp_broadcast_buffers=None, ddp_bucket_cap_mb=None, ddp_find_unused_parameters=None,
             ddp_static_graph=None, ddp_timeout=1800, eval_use_gather_object=False, liger_kernel_config=None,
             local_rank=-1, torch_compile=False, torch_compile_backend=None, torch_compile_mode=None,
             torch_empty_cache_steps=None, use_cache=False, use_liger_kernel=False),
    "fsdp_config": HfOnly(None, "PyTorch FSDP's wrapping and prefetch tuning; jtrain shards with `fsdp` or "
                                "`mesh_shape` and XLA schedules the gathers"),
    "enable_jit_checkpoint": HfOnly(False, "jtrain always writes a checkpoint on SIGTERM (docs/checkpoints.md)",
                                    hint=bool),
    **{name: HfOnly(default, _UPLOAD, hint=hint) for name, default, hint in (
        ("hub_always_push", False, bool), ("hub_model_id", None, Any), ("hub_private_repo", None, bool | None),
        ("hub_revision", None, Any), ("hub_strategy", "every_save", Any), ("hub_token", None, Any))},
    **{name: HfOnly(default, _TRACKIO) for name, default in (
        ("project", "huggingface"), ("trackio_bucket_id", None), ("trackio_space_id", None),
        ("trackio_static_space_id", None))},
    "push_to_hub": HfOnly(False, NO_UPLOAD, refused=True, hint=bool),
    "deepspeed": HfOnly(None, "DeepSpeed is PyTorch's; jtrain's ZeRO-style sharding is `fsdp: full_shard` "
                              "(or `mesh_shape: {fsdp: N}`)", refused=True),
    "parallelism_config": HfOnly(None, "accelerate's parallel layout; set jtrain's `mesh_shape` (data, fsdp, "
                                       "tensor, sequence axes)", refused=True),
    "debug": HfOnly("", "HF's torch debug hooks; non-finite losses are jtrain's `nonfinite_policy`", refused=True),
}
"""HF TrainingArguments field -> its default and what jtrain does with it."""


def hf_only_values(given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The HF-only fields among `given`, typed as HF's defaults (a config's "false" is False).

    A refused field switched on raises ConfigError naming every such field with its reason; fields
    set away from HF's default with no effect here are named once in a warning, grouped by reason.
    """
    values = {key: coerce(value, HF_ONLY_FIELDS[key].hint, f"{where}.{key}") for key, value in given.items()
              if key in HF_ONLY_FIELDS}
    refused = [f"`{key}={value!r}`: {HF_ONLY_FIELDS[key].reason}" for key, value in values.items()
               if HF_ONLY_FIELDS[key].refused and value]
    if refused:
        raise ConfigError(f"{where}: {'; '.join(refused)}")
    by_reason: dict[str, list[str]] = {}
    for key, value in values.items():
        if value != HF_ONLY_FIELDS[key].default:
            by_reason.setdefault(HF_ONLY_FIELDS[key].reason, []).append(f"`{key}`")
    if by_reason:
        logger.warning("%s: no effect in jtrain: %s", where,
                       "; ".join(f"{', '.join(keys)} ({reason})" for reason, keys in by_reason.items()))
    return values


def unknown_keys_message(keys: Iterable[str], valid: Iterable[str]) -> str:
    """One message for several unknown keys, each with the closest valid name."""
    valid = list(valid)
    return "; ".join(f"unknown key `{key}`{closest_key_hint(key, valid)}" for key in keys)
