"""The run configuration: one YAML/JSON file with `model`, `tokenizer`, `data`, `peft`,
`quantization` and `training` sections, plus command-line overrides (`--learning_rate 3e-4`, `--data.block_size 64`).

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


TASKS = ("clm", "classification", "mlm", "sft")
SOURCES = ("stdlib", "files")
TOKENIZER_TYPES = ("auto", "bpe", "wordpiece")


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelSection:
    model_name_or_path: str | None = _f(None, "Local HF checkpoint directory (config.json + safetensors) to start "
                                              "from; jtrain never downloads.")
    config_name: str | None = _f(None, "config.json (or a directory holding one) of a fresh model (HF's "
                                       "--config_name); its weights are initialised, not loaded.")
    model_type: str = _f("llama", "Architecture when training from scratch: llama, mistral, qwen2, qwen3, gemma, "
                                  "gemma2, mixtral, gpt2, bert, roberta.")
    config: dict = _f({}, "HF config.json fields for a from-scratch model, or overrides of config_name's (vocab_size, "
                          "special ids and labels are set from the tokenizer and data).")
    ignore_mismatched_sizes: bool = _f(False, "Initialise afresh the checkpoint's weights whose shape differs "
                                              "from the model's (HF's flag; e.g. a classifier's head for another "
                                              "number of labels), instead of refusing the checkpoint.")
    scan_layers: bool = _f(False, "Scan over layers (flat compile time as depth grows).")
    attention_impl: str = _f("auto", "Attention kernel: auto (cuDNN's fused kernel on NVIDIA GPUs in bf16/fp16, "
                                     "XLA's elsewhere) | xla | cudnn | reference.")
    sequence_parallel_attention: str = _f("all_gather", "Attention when `mesh_shape` has a sequence axis: "
                                                        "all_gather (keys and values gathered to the whole length "
                                                        "on every device) | ring (their blocks passed round the "
                                                        "devices; less memory for long rows; decoders hold "
                                                        "their rows in zigzag order so every device does the "
                                                        "same causal work) | ring_contiguous (the ring with "
                                                        "contiguous blocks, to measure that balance).")

    def __post_init__(self) -> None:
        _need(not (self.model_name_or_path and (self.config or self.config_name)),
              "`model.model_name_or_path` loads a checkpoint with its own config.json: remove `model.config` / "
              "`model.config_name`, which describe a from-scratch model")


@dataclass(frozen=True)
class TokenizerSection:
    tokenizer_name: str | None = _f(None, "tokenizer.json or a directory holding one (default: the model "
                                          "directory's, else one trained on the training text).")
    vocab_size: int = _f(4096, "Vocabulary of the tokenizer trained on the training text when none is given.")
    tokenizer_type: str = _f("auto", "Tokenizer trained when none is given: auto (wordpiece for bert, byte-level "
                                     "BPE otherwise) | bpe | wordpiece.")
    lowercase: bool = _f(False, "wordpiece: lowercase the text (an uncased model).")

    def __post_init__(self) -> None:
        _need(self.tokenizer_type in TOKENIZER_TYPES, f"`tokenizer.tokenizer_type` must be one of "
                                                      f"{list(TOKENIZER_TYPES)}, got {self.tokenizer_type!r}")
        _need(self.vocab_size >= 64, f"`tokenizer.vocab_size` must be >= 64, got {self.vocab_size}")


@dataclass(frozen=True)
class DataSection:
    task: str = _f("clm", "clm (causal LM, block packing) | classification (text -> label) | mlm (masked LM) | "
                          "sft (causal LM on prompt/completion pairs, loss on the completion only).")
    source: str = _f("stdlib", "stdlib (no download: Python's own source for clm, docstrings labelled by package "
                               "for classification, docstrings for mlm, docstring -> signature for sft) | files.")
    train_file: str | None = _f(None, "Training file (.txt, .json, .jsonl, .csv, .parquet) when source=files, or "
                                      "a directory written by datasets' save_to_disk (a DatasetDict's: dir/train).")
    validation_file: str | None = _f(None, "Validation file (or saved-dataset directory) when source=files.")
    test_file: str | None = _f(None, "Test file for do_predict when source=files.")
    text_column: str = _f("text", "Column that holds the text.")
    text_columns: list[str] | None = _f(None, "classification: one or two text columns (a pair); default "
                                              "[text_column]. With text_column_delimiter, any number, joined.")
    text_column_delimiter: str | None = _f(None, "classification: join the text_columns into one text with this "
                                                 "string (HF's run_classification.py, which uses ' ').")
    label_column: str = _f("label", "classification: column that holds the label (classes of any type, mapped to "
                                    "ids; float targets: a regression; lists of classes: multi-label).")
    do_regression: bool | None = _f(None, "classification: true treats the labels as regression targets (one "
                                          "output, mean-squared error), false as classes; unset: float labels "
                                          "are a regression (HF's rule).")
    metric_name: str | None = _f(None, "classification: HF evaluate's metric to report (accuracy, f1, precision, "
                                       "recall, matthews_correlation, mse, mae, pearsonr, spearmanr), computed "
                                       "locally; default accuracy, mse for a regression, micro-F1 multi-label.")
    prompt_column: str = _f("prompt", "sft: column that holds the prompt.")
    completion_column: str = _f("completion", "sft: column that holds the completion (the only tokens trained).")
    block_size: int = _f(128, "clm: tokens per packed training row.")
    max_seq_length: int = _f(128, "classification/mlm/sft: tokens per example (longer ones are truncated).")
    mlm_probability: float = _f(0.15, "mlm: fraction of tokens masked (BERT's 80/10/10 rule).")
    line_by_line: bool = _f(False, "mlm: each text (a .txt file's line) is one row, truncated to max_seq_length "
                                   "and padded per batch, as HF's --line_by_line; default: the texts "
                                   "concatenated and cut into rows of max_seq_length.")
    max_files: int | None = _f(None, "stdlib source: use at most this many files.")
    stdlib_packages: list[str] | None = _f(None, "stdlib source: only these top-level packages/modules (for "
                                                 "classification they are the classes).")
    validation_percent: float = _f(5.0, "stdlib source: percent of files held out for evaluation; clm/mlm files "
                                        "without a validation_file: percent of the training file's rows (its "
                                        "first ones, as HF's validation_split_percentage) evaluated on instead.")
    max_train_samples: int | None = _f(None, "Train on at most this many examples (rows for clm/mlm).")
    max_eval_samples: int | None = _f(None, "Evaluate on at most this many examples (rows for clm/mlm).")
    max_eval_rows: int | None = _f(None, "Older name of max_eval_samples.")
    max_predict_samples: int | None = _f(None, "classification: predict on at most this many test examples.")
    shuffle_train_dataset: bool = _f(False, "classification: shuffle the training examples once, as HF datasets' "
                                            "shuffle(seed=shuffle_seed), before max_train_samples takes the first "
                                            "ones (training batches are shuffled every epoch regardless).")
    shuffle_seed: int = _f(42, "classification: the seed of shuffle_train_dataset.")

    def __post_init__(self) -> None:
        _need(self.task in TASKS, f"`data.task` must be one of {list(TASKS)}, got {self.task!r}")
        _need(self.source in SOURCES, f"`data.source` must be one of {list(SOURCES)}, got {self.source!r}")
        for name in ("block_size", "max_seq_length"):
            _need(getattr(self, name) >= 4, f"`data.{name}` must be >= 4, got {getattr(self, name)}")
        _need(0.0 < self.mlm_probability < 1.0,
              f"`data.mlm_probability` must lie in (0, 1), got {self.mlm_probability}")
        _need(0.0 < self.validation_percent < 100.0,
              f"`data.validation_percent` must lie in (0, 100), got {self.validation_percent}")
        for name in ("max_files", "max_train_samples", "max_eval_samples", "max_eval_rows", "max_predict_samples"):
            value = getattr(self, name)
            _need(value is None or value >= 1, f"`data.{name}` must be >= 1, got {value}")
        _need(self.text_columns is None or 1 <= len(self.text_columns) <= 2 or (
            self.text_column_delimiter is not None and len(self.text_columns) >= 1),
              f"`data.text_columns` takes one or two columns (a pair), or any number with "
              f"`data.text_column_delimiter` (joined), got {self.text_columns}")
        if self.metric_name is not None:
            from jtrain.data.classification_metrics import check_metric_name

            check_metric_name(self.metric_name)

    @property
    def eval_limit(self) -> int | None:
        return self.max_eval_samples if self.max_eval_samples is not None else self.max_eval_rows

    @property
    def classification_columns(self) -> list[str]:
        return list(self.text_columns or [self.text_column])


@dataclass(frozen=True)
class PeftSection:
    """LoRA options with PEFT's `LoraConfig` names and defaults; present only when the file has `peft:`."""

    peft_type: str = _f("LORA", "PEFT method; jtrain implements LORA.")
    r: int = _f(8, "LoRA rank.")
    lora_alpha: float = _f(8, "LoRA scale numerator: the update is (lora_alpha / r) * B A.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input, in training only.")
    target_modules: Any = _f(None, "Modules to adapt: a list of names (a name matches the last components of "
                                   "the dotted module path, e.g. q_proj) or a regex string matched against the "
                                   "whole path; default: PEFT's per-architecture list (llama: q_proj, v_proj).")
    bias: str = _f("none", "Biases that train: none | all | lora_only (those of the adapted modules).")
    modules_to_save: list[str] | None = _f(None, "Modules trained in full beside the adapters (e.g. a new head).")
    use_rslora: bool = _f(False, "rsLoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r.")
    init_lora_weights: bool = _f(True, "PEFT's init (B = 0, so training starts at the base model); false "
                                       "makes B random too.")
    use_dora: bool = _f(False, "DoRA: also train a magnitude per output feature of each adapted layer "
                               "(W' = m (W + s B A) / ||W + s B A||), as PEFT's use_dora.")
    rank_pattern: dict | None = _f(None, "Per-module r: {module-name pattern: r} (PEFT's; a key matches a name "
                                         "ending with it, as a regex).")
    alpha_pattern: dict | None = _f(None, "Per-module lora_alpha: {module-name pattern: alpha} (PEFT's).")
    layers_to_transform: Any = _f(None, "Layer index or indices whose modules are adapted (list targets only).")
    layers_pattern: Any = _f(None, "Name(s) of the numbered layer container for layers_to_transform (layers, h).")
    exclude_modules: Any = _f(None, "Modules never adapted: names (suffix match) or a full-match regex.")
    save_merged: bool = _f(False, "Also write the base with the adapters merged in, as a full HF model, to "
                                  "output_dir/merged (save_model writes only the adapters otherwise).")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _targets(self.target_modules, "peft.target_modules"))
        self.lora_config()  # checks every value now, before anything is read or written

    def lora_config(self) -> Any:
        """The `jtrain.peft.LoraConfig` these options describe."""
        from jtrain.peft.config import LoraConfig

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "save_merged"}
        return LoraConfig.from_dict(values)


def _targets(value: Any, key: str) -> Any:
    """Module targets: a list of names (also a YAML list given on the command line) or a regex string."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = yaml.safe_load(value)
    if isinstance(value, (list, tuple)):
        return [str(t) for t in value]
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"`{key}` must be a list of module names or a regex string, got {value!r}")
    return value


@dataclass(frozen=True)
class QuantizationSection:
    """Frozen quantised base weights (QLoRA's base) with HF `BitsAndBytesConfig`'s names; present only
    when the file has `quantization:`. jtrain stores and dequantises them itself (no bitsandbytes)."""

    load_in_4bit: bool = _f(False, "Store the target kernels in 4 bits (bnb_4bit_quant_type).")
    load_in_8bit: bool = _f(False, "Store the target kernels as int8 with per-output-channel scales (LLM.int8's "
                                   "storage; computed dequantised, without its outlier split).")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit format: nf4 (QLoRA's NormalFloat) | int4 (symmetric integers); "
                                         "bitsandbytes' fp4 is not implemented.")
    bnb_4bit_use_double_quant: bool = _f(False, "Quantise the nf4 block scales too (QLoRA's double quantisation, "
                                                "4.127 instead of 4.5 bits per parameter).")
    quant_block_size: int | None = _f(None, "Weights per absmax scale along a kernel's last axis (default: 64 for nf4, "
                                      "per output channel for int8/int4); it must divide every target kernel's "
                                      "last dimension (e.g. head_dim for q/k/v).")
    target_modules: Any = _f(None, "Modules whose kernels are quantised: names or a regex, as peft.target_modules "
                                   "(default: every linear layer except the task head, as bitsandbytes skips lm_head).")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _targets(self.target_modules, "quantization.target_modules"))
        self.quant_format()  # checks every value now, before anything is read or written

    def quant_format(self) -> Any:
        """The `jtrain.quant.QuantFormat` these options describe."""
        from jtrain.quant.formats import as_format

        _need(self.load_in_4bit != self.load_in_8bit,
              "the `quantization` section needs exactly one of load_in_4bit: true or load_in_8bit: true "
              f"(got load_in_4bit={self.load_in_4bit}, load_in_8bit={self.load_in_8bit})")
        if self.load_in_8bit:
            _need(not self.bnb_4bit_use_double_quant,
                  "`quantization.bnb_4bit_use_double_quant` applies to load_in_4bit with nf4 only")
            name = "int8"
        else:
            _need(self.bnb_4bit_quant_type in ("nf4", "int4"),
                  f"`quantization.bnb_4bit_quant_type` must be nf4 or int4, got {self.bnb_4bit_quant_type!r}"
                  + (" (bitsandbytes' fp4 is not implemented; nf4 is QLoRA's choice)"
                     if self.bnb_4bit_quant_type == "fp4" else ""))
            name = self.bnb_4bit_quant_type
        options: dict[str, Any] = {"double_quant": self.bnb_4bit_use_double_quant}
        if self.quant_block_size is not None:
            options["block_size"] = self.quant_block_size
        try:
            return as_format(name, **options)
        except ConfigError as err:  # QuantFormat names its own field; the section calls it quant_block_size
            message = str(err).replace("`block_size`", "`quant_block_size`")
            raise ConfigError(f"the `quantization` section: {message}") from err

    def describe(self) -> str:
        fmt = self.quant_format()
        scales = f"block {fmt.block_size}" if fmt.block_size else "per-channel scales"
        return f"{fmt.name} ({scales}{', double quantisation' if fmt.double_quant else ''})"


@dataclass(frozen=True)
class HPSearchSection:
    """HF's `Trainer.hyperparameter_search` (optuna) from a run config; present only when the file has
    `hp_search:`. Each trial trains a fresh model in output_dir/run-N and is ranked on the evaluation set."""

    n_trials: int = _f(10, "Trials to run.")
    direction: str = _f("minimize", "minimize | maximize the objective.")
    metric: str | None = _f(None, "Evaluation metric to rank trials by (eval_loss, eval_accuracy, ...); default: "
                                  "HF's objective (eval_loss, or the sum of compute_metrics' metrics).")
    space: dict = _f({}, "TrainingArguments field -> {type: float|int, low, high, log} or {type: categorical, "
                         "choices: [...]}.")
    sampler: str = _f("tpe", "optuna sampler: tpe | random | grid (every combination of categorical choices).")
    seed: int | None = _f(None, "Sampler seed (a fixed seed repeats the same trials).")

    def __post_init__(self) -> None:
        from jtrain.hp_search import check_space

        _need(self.n_trials >= 1, f"hp_search.n_trials must be at least 1, got {self.n_trials}")
        _need(self.direction in ("minimize", "maximize"),
              f"hp_search.direction must be minimize or maximize, got {self.direction!r}")
        _need(self.sampler in ("tpe", "random", "grid"),
              f"hp_search.sampler must be tpe, random or grid, got {self.sampler!r}")
        fields = {f.name for f in dataclasses.fields(TrainingArguments)} - {"output_dir"}
        object.__setattr__(self, "space", check_space(self.space, fields))


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    peft: PeftSection | None = None  # None: every weight trains
    quantization: QuantizationSection | None = None  # None: float base weights
    hp_search: HPSearchSection | None = None  # None: one run (no hyperparameter search)
    training: TrainingArguments = field(default_factory=TrainingArguments)

    def to_dict(self) -> dict:
        return {name: (dataclass_to_dict(v) if dataclasses.is_dataclass(v) else v)
                for name, v in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))}


SECTIONS: dict[str, type] = {"model": ModelSection, "tokenizer": TokenizerSection, "data": DataSection,
                             "training": TrainingArguments}
# `peft` and `quantization` are optional: built only when the file (or an override) has them, so their
# absence means no LoRA and a float base.
OPTIONAL_SECTIONS: dict[str, type] = {"peft": PeftSection, "quantization": QuantizationSection,
                                      "hp_search": HPSearchSection}


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
        if section not in SECTIONS and section not in OPTIONAL_SECTIONS:
            raise ConfigError(f"unknown section `{section}` in `--{key}`{closest_key_hint(section, SECTIONS)}")
        return section, name
    every_section = {**SECTIONS, **OPTIONAL_SECTIONS}
    owners = [s for s, cls in every_section.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if "training" in owners or key in TrainingArguments.extra_init_keys:  # HF's PyTorch/Hub fields too
        return "training", key
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(f"`--{key}` is ambiguous: write --{owners[0]}.{key} or --{owners[1]}.{key}")
    every = [f.name for cls in every_section.values() for f in dataclasses.fields(cls)]
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
    valid = list(SECTIONS) + list(OPTIONAL_SECTIONS)
    for section, body in values.items():
        if section not in valid:
            raise ConfigError(f"unknown section `{section}`{closest_key_hint(section, valid)}; "
                              f"valid sections: {', '.join(valid)}")
        if body is not None and not isinstance(body, Mapping):
            raise ConfigError(f"section `{section}` must be a mapping, got {body!r}")
    values = dict(values)
    training = dict(values.get("training") or {})
    if "do_train" not in training:
        # jtrain.run's convention: a run config trains unless it says `do_train: false`. TrainingArguments
        # keeps HF's default (false) for Python use, and jtrain's HF-style scripts pass false for every
        # do_* flag not given, as HF's do.
        values["training"] = {**training, "do_train": True}
    built = {name: build_dataclass(cls, values.get(name) or {}, name) for name, cls in SECTIONS.items()}
    optional = {name: build_dataclass(cls, values[name] or {}, name) if name in values else None
                for name, cls in OPTIONAL_SECTIONS.items()}
    return RunConfig(**optional, **built)


def check_run_config(cfg: RunConfig) -> None:
    """Options that cannot work together, refused before anything is read or written."""
    d, a = cfg.data, cfg.training
    _need(a.do_train or a.do_eval or a.do_predict, "nothing to do: set do_train, do_eval or do_predict")
    if d.source == "files":
        _need(not a.do_train or d.train_file, "do_train needs `data.train_file` when data.source is 'files' "
                                              "(or set do_train false)")
        _need(not a.do_eval or d.validation_file or (d.task in ("clm", "mlm") and d.train_file),
              "do_eval needs `data.validation_file` when data.source is 'files' (or set do_eval false; clm and "
              "mlm hold out `data.validation_percent` of the train_file instead)")
    else:
        given = [n for n in ("train_file", "validation_file", "test_file") if getattr(d, n)]
        _need(not given, f"`data.{given[0] if given else ''}` is set but data.source is 'stdlib': set "
                         "data.source: files to read it")
    _need(not a.do_predict or d.test_file, "do_predict needs `data.test_file` (with data.source: files)")
    if cfg.hp_search is not None:
        _need(a.do_train and a.do_eval, "hp_search trains every trial and ranks it on the evaluation set: set "
                                        "training.do_train and training.do_eval true")
        _need(not a.resume_from_checkpoint, "hp_search starts every trial afresh: remove "
                                            "training.resume_from_checkpoint")
    _need(a.do_train or cfg.model.model_name_or_path,
          "evaluating without training needs `model.model_name_or_path` (a trained model to evaluate)")


def load_config(path: str | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read the file, apply overrides, type every value and check the combination."""
    values = read_config_file(path) if path else {}
    cfg = build_config(apply_overrides(values, overrides or {}))
    check_run_config(cfg)
    return cfg


_RESERVED = ("config", "print_config", "help")


def help_text(sections: Sequence[str] = ("model", "tokenizer", "data", "peft", "quantization", "training")) -> str:
    """Every option with its default and one line of help, grouped by section."""
    lines = ["usage: python -m jtrain.run --config FILE [--print_config] [--KEY VALUE ...]", ""]
    for section in sections:
        lines.append(f"{section}:" if section in SECTIONS else
                     f"{section}: (only when the file has a `{section}:` section or an option of it is given)")
        for f in dataclasses.fields({**SECTIONS, **OPTIONAL_SECTIONS}[section]):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            name = f"{section}.{f.name}" if f.name in _RESERVED else f.name  # `--config` is the config file
            lines.append(f"  --{name} (default: {default!r})  {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)
