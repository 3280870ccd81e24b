"""HF `TrainingArguments` fields that jtrain's do not have, and why.

Code ported from HF's Trainer passes them (`torch_compile=True`, `ddp_find_unused_parameters=False`,
`hub_model_id=...`); a bare "unexpected keyword argument" would not say whether the option matters.
`TrainingArguments(...)` and a config's `training:` section refuse them naming the reason, and
jtrain's HF-style scripts accept them without effect (`jtrain.tasks.hf_args`). A test keeps the
table equal to the installed transformers' fields minus jtrain's.
"""

from __future__ import annotations

from typing import Iterable

from jtrain.coerce import closest_key_hint

_TORCH = ("a PyTorch/accelerate setting; JAX needs none: jtrain compiles every step with XLA and shards it "
          "over `mesh_shape`")
_UPLOAD = "jtrain never uploads; the written directories are what push_to_hub would upload"
_TRACKIO = "HF's trackio reporting; jtrain's `report_to` takes tensorboard, jsonl or none"

HF_ONLY_FIELDS: dict[str, str] = {
    **dict.fromkeys(("accelerator_config", "dataloader_in_order", "dataloader_multiprocessing_context",
                     "dataloader_persistent_workers", "dataloader_pin_memory", "ddp_backend",
                     "ddp_broadcast_buffers", "ddp_bucket_cap_mb", "ddp_find_unused_parameters", "ddp_static_graph",
                     "ddp_timeout", "debug", "deepspeed", "enable_jit_checkpoint", "eval_use_gather_object",
                     "fsdp_config", "liger_kernel_config", "local_rank", "parallelism_config", "torch_compile",
                     "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps", "use_cache",
                     "use_liger_kernel"), _TORCH),
    **dict.fromkeys(("push_to_hub", "hub_always_push", "hub_model_id", "hub_private_repo", "hub_revision",
                     "hub_strategy", "hub_token"), _UPLOAD),
    **dict.fromkeys(("project", "trackio_bucket_id", "trackio_space_id", "trackio_static_space_id"), _TRACKIO),
}
"""HF TrainingArguments field -> why jtrain has no such field."""


def unknown_keys_message(keys: Iterable[str], valid: Iterable[str]) -> str:
    """One message for several unknown keys: HF's own fields grouped by reason, then the others."""
    keys, valid = list(keys), list(valid)
    by_reason: dict[str, list[str]] = {}
    for key in keys:
        if key in HF_ONLY_FIELDS:
            by_reason.setdefault(HF_ONLY_FIELDS[key], []).append(f"`{key}`")
    parts = [f"{', '.join(names)}: HF TrainingArguments option{'s' if len(names) > 1 else ''} that jtrain does "
             f"not have ({reason}); remove {'them' if len(names) > 1 else 'it'}" for reason, names in by_reason.items()]
    parts += [f"unknown key `{key}`{closest_key_hint(key, valid)}" for key in keys if key not in HF_ONLY_FIELDS]
    return "; ".join(parts)


def unknown_field_hint(key: str, valid: Iterable[str]) -> str:
    """What to say after "unknown key `key`": HF's reason for one of HF_ONLY_FIELDS, else the closest valid key."""
    if key in HF_ONLY_FIELDS:
        return f" (an option of HF's TrainingArguments that jtrain does not have: {HF_ONLY_FIELDS[key]}; remove it)"
    return closest_key_hint(key, valid)
