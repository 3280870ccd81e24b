"""HF example-script arguments -> `python -m jtrain.run` arguments: a thin translation, no pipeline.

`scripts/run_clm.py`, `run_classification.py` and `run_mlm.py` accept the arguments of HF's
scripts of the same names (model_name_or_path, config_name, tokenizer_name, train_file,
text_column_name, max_seq_length, block_size, do_train, every TrainingArguments flag, ...),
rename the ones whose jtrain name differs, fix the task, and hand the result to
`jtrain.run.main`, so they run exactly the code path (and print exactly the errors) of
`python -m jtrain.run`. As in HF, `do_train`/`do_eval`/`do_predict` are off unless given.
Options with no meaning in jtrain (PyTorch, DDP, Hub, caches) are accepted and listed once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Sequence

from jtrain.errors import ConfigError
from jtrain.hf_only_args import HF_ONLY_FIELDS
from jtrain.jsonfile import read_json_object

logger = logging.getLogger(__name__)

RENAMES = {
    "model_name_or_path": "model.model_name_or_path", "config_name": "model.config_name",
    "model_type": "model.model_type", "tokenizer_name": "tokenizer.tokenizer_name",
    "train_file": "data.train_file", "validation_file": "data.validation_file", "test_file": "data.test_file",
    "text_column_name": "data.text_column", "text_column_names": "data.text_columns",
    "label_column_name": "data.label_column", "max_seq_length": "data.max_seq_length",
    "block_size": "data.block_size", "max_train_samples": "data.max_train_samples",
    "max_eval_samples": "data.max_eval_samples", "mlm_probability": "data.mlm_probability",
    "validation_split_percentage": "data.validation_percent", "text_column_delimiter": "data.text_column_delimiter",
    "do_regression": "data.do_regression", "metric_name": "data.metric_name",
    "max_predict_samples": "data.max_predict_samples", "shuffle_train_dataset": "data.shuffle_train_dataset",
    "shuffle_seed": "data.shuffle_seed", "ignore_mismatched_sizes": "model.ignore_mismatched_sizes",
    "line_by_line": "data.line_by_line",
}
"""HF argument -> jtrain key, where the names differ (every other key passes through unchanged)."""

_NEVER_DOWNLOADS = "jtrain never downloads: pass local --train_file/--validation_file (or no files: stdlib data)"
REFUSED = {"dataset_name": _NEVER_DOWNLOADS, "dataset_config_name": _NEVER_DOWNLOADS,
           "streaming": "streaming datasets are not supported",
           **{key: field.reason for key, field in HF_ONLY_FIELDS.items() if field.refused}}
"""Options refused when switched on, with the reason."""

IGNORED = {
    **dict.fromkeys(("cache_dir", "model_revision", "token", "use_auth_token", "trust_remote_code"),
                    "jtrain never downloads and runs only its own model code"),
    **dict.fromkeys(("overwrite_cache", "preprocessing_num_workers", "keep_linebreaks", "use_fast_tokenizer",
                     "remove_splits", "remove_columns", "pad_to_max_length", "low_cpu_mem_usage", "torch_dtype"),
                    "handled by jtrain's own data path (Rust tokenizer, length buckets, the files it is given)"),
    **{key: field.reason for key, field in HF_ONLY_FIELDS.items() if not field.refused},  # TrainingArguments' own
}
"""Accepted for compatibility, with no effect, and why."""

SCRATCH_MODEL = {"clm": "llama", "classification": "bert", "mlm": "bert"}
_FALSE = ("false", "0", "no", "off", "none", "null")


def parse_config_overrides(text: str) -> dict[str, Any]:
    """HF's `--config_overrides "n_embd=10,resid_pdrop=0.2"` as a dict (values read as YAML scalars)."""
    import yaml

    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--config_overrides: {item!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def read_json_args(path: str) -> list[str]:
    """HF's `python run_x.py args.json`: one JSON object of argument -> value."""
    values = read_json_object(path, what="a JSON object of arguments")
    return [f"--{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in values.items()]


def _switched_on(value: str) -> bool:
    return str(value).strip().lower() not in _FALSE


def translate(task: str, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(jtrain.run argv, notes about ignored options) for one HF-style command line."""
    from jtrain.run import parse_argv

    if len(argv) == 1 and argv[0].endswith(".json") and not argv[0].startswith("--"):
        argv = read_json_args(argv[0])
    cmd = parse_argv(argv)
    out = (["--config", cmd.config] if cmd.config else []) + (["--print_config"] if cmd.print_config else [])
    out += [f"--{k}={v}" for k, v in cmd.distributed.items()] + ["--data.task=" + task]
    notes, keys = [], dict(cmd.overrides)
    for key, value in list(keys.items()):
        if key in REFUSED and _switched_on(value):
            raise ConfigError(f"--{key}: {REFUSED[key]}")
        if key in REFUSED or key in IGNORED:
            notes += [f"--{key} ({IGNORED[key]})"] if key in IGNORED else []
            del keys[key]
    if "config_overrides" in keys:
        out.append("--model.config=" + json.dumps(parse_config_overrides(keys.pop("config_overrides"))))
    if not cmd.config:
        out += _script_defaults(task, keys)
        lengths, warned = length_defaults(task, keys)
        out += lengths
        for text in warned:
            logger.warning(text)
    out += [f"--{RENAMES.get(k, k)}={v}" for k, v in keys.items()]
    return out, notes


HF_LENGTH_CAP = 1024
"""run_clm/run_mlm: without --block_size/--max_seq_length, the tokenizer's model_max_length, at most this."""
LENGTH_KEY = {"clm": "block_size", "mlm": "max_seq_length", "classification": "max_seq_length"}


def tokenizer_max_length(keys: dict) -> float | None:
    """The model_max_length of the tokenizer HF's script would load (tokenizer_name, else the model's
    directory): its tokenizer_config.json's value, or unbounded (HF's VERY_LARGE_INTEGER) without one; None
    when the run names no tokenizer (jtrain trains one, which HF's scripts cannot)."""
    source = keys.get("tokenizer_name") or keys.get("model_name_or_path")
    if not source:
        return None
    if not os.path.exists(source):
        return float("inf")  # loading it names the missing path
    from jtrain.data.tokenizer import tokenizer_config

    value = tokenizer_config(source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))).get(
        "model_max_length")
    return float("inf") if value is None else float(value)


def length_defaults(task: str, keys: dict) -> tuple[list[str], list[str]]:
    """HF's row length rule: run_clm's block_size and run_mlm's max_seq_length default to the tokenizer's
    model_max_length capped at 1024 (run_classification's max_seq_length to 128, jtrain's default too), and
    a longer value than model_max_length is lowered to it with a warning. (arguments, warnings)"""
    key, limit = LENGTH_KEY[task], tokenizer_max_length(keys)
    if limit is None:
        return [], []
    if key not in keys:
        return ([f"--data.{key}={int(min(limit, HF_LENGTH_CAP))}"], []) if task != "classification" else ([], [])
    asked = str(keys[key]).strip()
    if not asked.isdigit() or int(asked) <= limit:
        return [], []  # jtrain's config check names a value that is not a length
    asked = int(asked)
    del keys[key]
    return [f"--data.{key}={int(limit)}"], [f"The {key} passed ({asked}) is larger than the maximum length for "
                                            f"the model ({int(limit)}). Using {key}={int(limit)}."]


def _script_defaults(task: str, keys: dict) -> list[str]:
    """HF's script defaults where jtrain's differ: nothing runs unless asked; files when given."""
    out = [f"--training.{flag}=false" for flag in ("do_train", "do_eval", "do_predict") if flag not in keys]
    if any(k in keys for k in ("train_file", "validation_file", "test_file")):
        out.append("--data.source=files")
    if not any(k in keys for k in ("model_name_or_path", "config_name", "model_type")):
        out.append(f"--model.model_type={SCRATCH_MODEL[task]}")
    if task == "classification":  # run_classification.py: the "sentence" column, or text_column_names joined by " "
        if "text_column_names" in keys and "text_column_delimiter" not in keys:
            out.append("--data.text_column_delimiter= ")
        if not any(k in keys for k in ("text_column_names", "text_column_name")):
            out.append("--data.text_column=sentence")
    return out


USAGE = """usage: python scripts/run_{script}.py [--config FILE] [HF example-script arguments] [TrainingArguments]

HF arguments and their jtrain names (every other option is a jtrain option, see below):
{renames}
  --config_overrides "k=v,k2=v2"  -> model.config (fields of a from-scratch model)
Without --config, do_train/do_eval/do_predict are off unless given (as in HF), train/validation/test
files switch data.source to files, and a from-scratch model is a {scratch} unless --model_type says.
With a tokenizer to read (--tokenizer_name or the model's directory), block_size (run_clm) and
max_seq_length (run_mlm) default to its model_max_length capped at 1024, and a longer value is lowered to
it, as in HF's scripts.
Accepted but without effect: {ignored}.
"""


def main(task: str, script: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of a script: translate, then run `jtrain.run.main` on the result."""
    from jtrain.run import EXIT_USAGE
    from jtrain.run import main as run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        renames = "\n".join(f"  --{k:<28} -> {v}" for k, v in RENAMES.items())
        print(USAGE.format(script=script, renames=renames, scratch=SCRATCH_MODEL[task],
                           ignored=", ".join(sorted(IGNORED))))
        return run_main(["--help"])
    try:
        translated, notes = translate(task, argv)
    except ConfigError as err:
        print(f"jtrain: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if notes:
        print(f"[jtrain] ignoring (no effect in jtrain): {', '.join(notes)}", file=sys.stderr)
    if os.environ.get("JTRAIN_SHOW_TRANSLATION"):
        print("[jtrain] python -m jtrain.run " + " ".join(translated), file=sys.stderr)
    return run_main(translated)
