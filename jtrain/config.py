"""The run configuration: one YAML/JSON file with `model`, `tokenizer`, `data`, `peft` and
`training` sections, plus command-line overrides (`--learning_rate 3e-4`, `--data.block_size 64`).

Plain frozen data; defaults live in the dataclasses below and in `TrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import yaml

from jtrain.args import TrainingArguments
from jtrain.coerce import build_dataclass, closest_key_hint, dataclass_to_dict
from jtrain.errors import ConfigError


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelSection:
    model_name_or_path: str | None = _f(None, "Local HF checkpoint directory (config.json + safetensors).")
    model_type: str = _f("llama", "Architecture when training from scratch: llama, mistral, qwen2, ...")
    config: dict = _f({}, "HF config.json fields for a from-scratch model (vocab_size is set from the tokenizer).")
    scan_layers: bool = _f(False, "Scan over layers (flat compile time as depth grows).")
    attention_impl: str = _f("xla", "Attention kernel: xla | cudnn | reference.")


@dataclass(frozen=True)
class TokenizerSection:
    tokenizer_name: str | None = _f(None, "tokenizer.json or a directory holding one (default: the model's).")
    vocab_size: int = _f(4096, "Vocabulary of the byte-level BPE trained on the training text when no tokenizer is given.")


@dataclass(frozen=True)
class DataSection:
    task: str = _f("clm", "clm (causal LM, block packing).")
    source: str = _f("stdlib", "stdlib (Python's own source files, no download) | files.")
    train_file: str | None = _f(None, "Training file (.txt, .json, .jsonl, .csv, .parquet) when source=files.")
    validation_file: str | None = _f(None, "Validation file when source=files.")
    text_column: str = _f("text", "Column that holds the text.")
    block_size: int = _f(128, "Tokens per packed training row.")
    max_files: int | None = _f(None, "stdlib source: use at most this many files.")
    validation_percent: float = _f(5.0, "stdlib source: percent of files held out for evaluation.")
    max_eval_rows: int | None = _f(None, "Evaluate on at most this many packed rows.")


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    peft: dict | None = None
    training: TrainingArguments = field(default_factory=TrainingArguments)

    def to_dict(self) -> dict:
        return {name: (dataclass_to_dict(v) if dataclasses.is_dataclass(v) else v)
                for name, v in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))}


SECTIONS: dict[str, type] = {"model": ModelSection, "tokenizer": TokenizerSection, "data": DataSection,
                             "training": TrainingArguments}


def read_config_file(path: str) -> dict:
    """Parse a YAML or JSON config file; errors name the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from err
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(values).__name__}")
    return dict(values)


def _section_of(key: str) -> tuple[str, str]:
    """Resolve an override key to (section, field): dotted, a TrainingArguments field, or unique elsewhere."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS and section != "peft":
            raise ConfigError(f"unknown section `{section}` in `--{key}`{closest_key_hint(section, SECTIONS)}")
        return section, name
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if "training" in owners:
        return "training", key
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(f"`--{key}` is ambiguous: write --{owners[0]}.{key} or --{owners[1]}.{key}")
    every = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    raise ConfigError(f"unknown option `--{key}`{closest_key_hint(key, every)}")


def apply_overrides(values: dict, overrides: Mapping[str, Any]) -> dict:
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in values.items()}
    for key, value in overrides.items():
        section, name = _section_of(key)
        merged.setdefault(section, {})
        if merged[section] is None:
            merged[section] = {}
        merged[section][name] = value
    return merged


def build_config(values: Mapping[str, Any]) -> RunConfig:
    """Typed RunConfig from a loosely typed mapping; unknown sections and keys are errors."""
    valid = list(SECTIONS) + ["peft"]
    for section, body in values.items():
        if section not in valid:
            raise ConfigError(f"unknown section `{section}`{closest_key_hint(section, valid)}; "
                              f"valid sections: {', '.join(valid)}")
        if body is not None and not isinstance(body, Mapping):
            raise ConfigError(f"section `{section}` must be a mapping, got {body!r}")
    built = {name: build_dataclass(cls, values.get(name) or {}, name) for name, cls in SECTIONS.items()}
    return RunConfig(peft=values.get("peft"), **built)


def load_config(path: str | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    values = read_config_file(path) if path else {}
    return build_config(apply_overrides(values, overrides or {}))


def help_text(sections: Sequence[str] = ("model", "tokenizer", "data", "training")) -> str:
    """Every option with its default and one line of help, grouped by section."""
    lines = ["usage: python -m jtrain.run --config FILE [--print_config] [--KEY VALUE ...]", ""]
    for section in sections:
        lines.append(f"{section}:")
        for f in dataclasses.fields(SECTIONS[section]):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{f.name} (default: {default!r})  {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)
