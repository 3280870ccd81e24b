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
import os
import sys
from typing import Any, Sequence

from jtrain.errors import ConfigError
from jtrain.hf_only_args import HF_ONLY_FIELDS
from jtrain.jsonfile import read_json_object

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
}
"""HF argument -> jtrain key, where the names differ (every other key passes through unchanged)."""

_NEVER_DOWNLOADS = "jtrain never downloads: pass local --train_file/--validation_file (or no files: stdlib data)"
REFUSED = {"dataset_name": _NEVER_DOWNLOADS, "dataset_config_name": _NEVER_DOWNLOADS,
           "streaming": "streaming datasets are not supported",
           "line_by_line": "masked-LM texts are concatenated and cut into rows (HF's default)",
           **{key: field.reason for key, field in HF_ONLY_FIELDS.items() if field.refused}}
"""Options refused when switched on, with the reason."""

IGNORED = {
    **dict.fromkeys(("cache_dir", "model_revision", "token", "use_auth_token", "trust_remote_code"),
                    "jtrain never downloads and runs only its own model code"),
    **dict.fromkeys(("overwrite_cache", "preprocessing_num_workers", "keep_linebreaks", "use_fast_tokenizer",
                     "remove_splits", "remove_columns",
                     "pad_to_max_length", "low_cpu_mem_usage", "torch_dtype"),
                    "handled by jtrain's own data path (Rust tokenizer, length buckets, per-epoch shuffling)"),
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
    out += [f"--{RENAMES.get(k, k)}={v}" for k, v in keys.items()]
    return out, notes


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
