"""`LoraConfig`: PEFT's LoRA options, with PEFT's names, meanings and defaults.

Kept as plain frozen data so it can come from a run config's `peft:` section, from a PEFT
`adapter_config.json`, or from Python. Matching follows PEFT: a list entry matches a module whose
dotted HF path equals it or ends with `.<entry>`; a string is a regex that must match the whole
dotted path (`re.fullmatch`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from jtrain.errors import ConfigError

BIAS_OPTIONS = ("none", "all", "lora_only")

# PEFT's per-architecture defaults (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
}

# adapter_config.json keys that jtrain reads, and those it accepts only at their PEFT default.
_IGNORED_PEFT_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "fan_in_fan_out",
    "auto_mapping", "peft_version",
    "megatron_config", "megatron_core", "loftq_config", "layer_replication", "runtime_config",
    "lora_bias", "eva_config", "corda_config", "trainable_token_indices",
    "target_parameters", "qalora_group_size", "use_qalora", "alora_invocation_tokens", "arrow_config",
    "ensure_weight_tying",
}
_MUST_BE_EMPTY = ("target_parameters",)


@dataclass(frozen=True)
class LoraConfig:
    """PEFT's `LoraConfig` (the options jtrain implements).

    `target_modules=None` takes PEFT's default for the architecture (llama: q_proj, v_proj;
    gpt2: c_attn; bert: query, value). `init_lora_weights=False` makes B random too (a test aid,
    as in PEFT); True is PEFT's default (A kaiming-uniform, B zero, so training starts at the base).

    Example::

        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = None  # list of names, a regex string, or None for the architecture default
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    use_rslora: bool = False
    init_lora_weights: bool = True
    # DoRA (Liu et al. 2024, PEFT's `use_dora`): each adapted output feature is rescaled to a trained
    # magnitude, W' = m * (W + s B A) / ||W + s B A|| (norm over the inputs, not differentiated).
    use_dora: bool = False
    # PEFT's per-module overrides and selection (same names, same matching rules; see `selects`).
    rank_pattern: dict | None = None  # {module-name pattern: r}
    alpha_pattern: dict | None = None  # {module-name pattern: lora_alpha}
    layers_to_transform: Any = None  # layer index or indices whose modules are adapted (list targets only)
    layers_pattern: Any = None  # name(s) of the numbered layer container (`layers`, `h`); None: any
    exclude_modules: Any = None  # names (suffix match) or a full-match regex never adapted
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if self.peft_type.upper() != "LORA":
            raise ConfigError(f"peft.peft_type {self.peft_type!r} is not supported; jtrain implements LORA")
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"peft.r (the LoRA rank) must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"peft.lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_OPTIONS:
            raise ConfigError(f"peft.bias must be one of {list(BIAS_OPTIONS)}, got {self.bias!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ConfigError(f"peft.target_modules {self.target_modules!r} is not a valid regex: {err}") from err
        elif self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(str(t) for t in self.target_modules))
            if not self.target_modules:
                raise ConfigError("peft.target_modules is empty: name the modules to adapt (or omit it for "
                                  "the architecture's default)")
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", tuple(str(m) for m in self.modules_to_save))
        for name, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            pattern = getattr(self, name) or {}
            if not isinstance(pattern, Mapping):
                raise ConfigError(f"peft.{name} must map module-name patterns to values, got {pattern!r}")
            bad = {k: v for k, v in pattern.items() if isinstance(v, bool) or not isinstance(v, (int, float))
                   or v <= 0 or (kind is int and int(v) != v)}
            if bad:
                raise ConfigError(f"peft.{name} values must be positive {'integers' if kind is int else 'numbers'}, "
                                  f"got {bad}")
            object.__setattr__(self, name, {str(k): kind(v) for k, v in pattern.items()} or None)
        layers = self.layers_to_transform
        if layers is not None and not isinstance(layers, int):
            layers = tuple(layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ConfigError(f"peft.layers_to_transform must be a layer index or a list of them, got {layers!r}")
            object.__setattr__(self, "layers_to_transform", layers or None)
        for name in ("layers_pattern", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(str(v) for v in value) or None)

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), as PEFT computes it."""
        return float(self.lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_for(self, module: str) -> int:
        """r of `module`: its `rank_pattern` entry (PEFT's first matching key), else `r`."""
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def scaling_for(self, module: str) -> float:
        """The scale of `module`'s update: its alpha (`alpha_pattern`, else `lora_alpha`) over its r
        (or sqrt(r) with rsLoRA), as PEFT's `update_layer` computes it."""
        r, alpha = self.rank_for(module), float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def selects(self, module: str, targets: Any) -> bool:
        """PEFT's `check_target_module_exists`: excluded modules and `modules_to_save` never; then the
        targets; an entry matched by suffix (not by the whole name) also needs its layer index (the
        number after `layers_pattern`, or after the first numbered container) in `layers_to_transform`."""
        excluded = self.exclude_modules
        if excluded and (re.fullmatch(excluded, module) if isinstance(excluded, str)
                         else module in excluded or any(module.endswith("." + e) for e in excluded)):
            return False
        if self.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        if module in targets:
            return True
        if not any(module.endswith("." + t) for t in targets):
            return False
        if self.layers_to_transform is None:
            return True
        index = layer_index(module, self.layers_pattern)
        wanted = self.layers_to_transform
        return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)

    def targets_for(self, model_type: str) -> Any:
        """The explicit targets, or PEFT's default for `model_type`."""
        if self.target_modules is not None:
            return self.target_modules
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ConfigError(f"no default peft.target_modules for model_type {model_type!r}: set target_modules")
        return DEFAULT_TARGET_MODULES[model_type]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "peft", strict: bool = True) -> LoraConfig:
        """From a run config's `peft:` section (strict: unknown keys are errors) or a PEFT
        adapter_config.json (`strict=False`: PEFT's other options are ignored at their defaults)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        known, unknown = {}, []
        for key, value in values.items():
            if key in fields:
                known[key] = value
            elif key in _MUST_BE_EMPTY and value:
                raise ConfigError(f"{source}: `{key}` = {value!r} is not supported by jtrain's LoRA")
            elif key not in _IGNORED_PEFT_KEYS and strict:
                unknown.append(key)
        if unknown:
            from difflib import get_close_matches

            hints = [f"{k} (did you mean {m[0]}?)" if (m := get_close_matches(k, fields, 1)) else k for k in unknown]
            raise ConfigError(f"{source}: unknown LoRA option(s) {', '.join(hints)}; "
                              f"valid: {', '.join(sorted(fields))}")
        if known.get("modules_to_save") is None:
            known.pop("modules_to_save", None)
        if isinstance(known.get("init_lora_weights"), str):
            raise ConfigError(f"{source}: init_lora_weights={known['init_lora_weights']!r} is not supported; "
                              "use true (PEFT's default) or false")
        return cls(**known)

    def to_peft_dict(self, model_type: str, base_model_name_or_path: str | None, task_type: str | None,
                     fan_in_fan_out: bool) -> dict[str, Any]:
        """adapter_config.json as PEFT writes it (keys PEFT reads; the rest take PEFT's defaults)."""
        targets = self.targets_for(model_type)
        return {
            "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
            "r": self.r, "lora_dropout": self.lora_dropout,
            "lora_alpha": int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "bias": self.bias, "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "use_rslora": self.use_rslora, "init_lora_weights": self.init_lora_weights,
            "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "use_dora": self.use_dora,
            "layers_to_transform": (list(self.layers_to_transform) if isinstance(self.layers_to_transform, tuple)
                                    else self.layers_to_transform),
            "layers_pattern": (list(self.layers_pattern) if isinstance(self.layers_pattern, tuple)
                               else self.layers_pattern),
            "rank_pattern": dict(self.rank_pattern or {}), "alpha_pattern": dict(self.alpha_pattern or {}),
            "exclude_modules": (sorted(self.exclude_modules) if isinstance(self.exclude_modules, tuple)
                                else self.exclude_modules),
        }


def matches_target(module_name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule on a dotted module path (`model.layers.0.self_attn.q_proj`)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    r"""PEFT's `get_pattern_key`: the first key `k` with `module` matching `(.*\.)?(k)$`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def layer_index(module: str, layers_pattern: Any = None) -> int | None:
    """The layer number in a dotted module name, as PEFT finds it: the first number after one of
    `layers_pattern` (`model.layers.3.mlp` -> 3), or without one after the first numbered container."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern):
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))
