"""`Trainer.create_model_card`: the README.md HF's Trainer writes next to a saved model.

Same layout as HF's generated card, so the Hub reads it the same way: YAML metadata
(`library_name`, `license`, `base_model`, `tags`, `datasets`, `metrics`, and a `model-index`
whose results carry task, dataset and metrics), then the description, the hyperparameters,
the table of evaluations during training (from `state.log_history`) and the framework
versions. The weights jtrain saves are HF checkpoints, so `library_name` is `transformers`;
the tags add `jtrain` next to HF's `generated_from_trainer`.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from jtrain.jsonfile import atomic_write

# HF's pipeline tags for jtrain's tasks, with the names HF shows for them.
TASK_TAGS = {"causal_lm": "text-generation", "masked_lm": "fill-mask",
             "sequence_classification": "text-classification", "token_classification": "token-classification"}
TASK_NAMES = {"text-generation": "Causal Language Modeling", "fill-mask": "Masked Language Modeling",
              "text-classification": "Text Classification", "token-classification": "Token Classification",
              "question-answering": "Question Answering", "summarization": "Summarization",
              "translation": "Translation", "text2text-generation": "Sequence-to-sequence Language Modeling"}
# Evaluation results the Hub knows as metric types (a result named "F1" becomes type "f1").
METRIC_TAGS = ("accuracy", "bleu", "f1", "matthews_correlation", "pearsonr", "precision", "recall", "rouge",
               "sacrebleu", "spearmanr", "wer")
_EVAL_SPEED = ("runtime", "samples_per_second", "steps_per_second")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _title(key: str) -> str:
    """`eval_mean_iou` -> "Mean Iou" (HF's column names)."""
    return " ".join(part.capitalize() for part in key.split("_"))


def _rounded(value: Any) -> str:
    text = str(value)
    if isinstance(value, float) and "." in text and len(text.split(".")[1]) > 4:
        return f"{value:.4f}"
    return text


def evaluation_history(log_history: list[dict]) -> tuple[list[dict], dict | None]:
    """The evaluations logged during training (one row each, with the last training loss seen
    before it) and the last evaluation's results, as HF's card reports them."""
    end = next((i for i, entry in enumerate(log_history) if "train_runtime" in entry), None)
    rows: list[dict] = []
    if end is not None:
        training_loss: Any = "No log"
        for entry in log_history[:end]:
            training_loss = entry.get("loss", training_loss)
            if "eval_loss" not in entry:
                continue
            row = {"Training Loss": training_loss, "Epoch": entry.get("epoch"), "Step": entry.get("step")}
            for key, value in entry.items():
                if key in ("epoch", "step", "total_flos") or key in {f"eval_{s}" for s in _EVAL_SPEED}:
                    continue
                row["Validation Loss" if key == "eval_loss" else _title(key.split("_", 1)[1])] = value
            rows.append(row)
    evals = [entry for entry in log_history if "eval_loss" in entry]
    if not evals:
        return rows, None
    results = {_title(key.removeprefix("eval_")): value for key, value in evals[-1].items()
               if key.removeprefix("eval_") not in _EVAL_SPEED + ("epoch", "step")}
    return rows, results


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys as a centred markdown table, columns as wide as their longest cell."""
    columns = list(rows[0])
    cells = [[_rounded(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "".join(f"| {v}" + " " * (w - len(v) + 1) for v, w in zip(values, widths)) + "|\n"
    return line(columns) + "".join("|:" + "-" * w + ":" for w in widths) + "|\n" + "".join(line(r) for r in cells)


def hyperparameters(trainer: Any) -> dict[str, Any]:
    """What HF's card lists: the batch sizes, seed, optimizer, schedule and length of training."""
    from jtrain.sharding import data_parallel_size

    a, devices, total = trainer.args, data_parallel_size(trainer.mesh), trainer.get_total_train_batch_size()
    out: dict[str, Any] = {"learning_rate": a.learning_rate, "train_batch_size": a.per_device_train_batch_size,
                           "eval_batch_size": a.per_device_eval_batch_size, "seed": a.seed}
    if devices > 1:
        out["num_devices"] = devices
    if a.gradient_accumulation_steps > 1:
        out["gradient_accumulation_steps"] = a.gradient_accumulation_steps
    if total != a.per_device_train_batch_size:
        out["total_train_batch_size"] = total
    if devices > 1:
        out["total_eval_batch_size"] = a.per_device_eval_batch_size * devices
    extra = a.optim_args or "No additional optimizer arguments"
    if trainer.optimizer_cls_and_kwargs is not None:
        factory, kwargs = trainer.optimizer_cls_and_kwargs
        out["optimizer"] = f"Use {getattr(factory, '__name__', factory)} (optax) with {kwargs or {}}"
    elif "adam" in a.optim.lower():
        out["optimizer"] = (f"Use {a.optim} with betas=({a.adam_beta1},{a.adam_beta2}) and epsilon={a.adam_epsilon} "
                            f"and optimizer_args={extra}")
    else:
        out["optimizer"] = f"Use {a.optim} and the args are:\n{extra}"
    out["lr_scheduler_type"] = a.lr_scheduler_type
    if a.warmup_steps:
        out["lr_scheduler_warmup_steps"] = a.warmup_steps
    if a.max_steps > 0:
        out["training_steps"] = a.max_steps
    else:
        out["num_epochs"] = a.num_train_epochs
    if a.fp16 or a.bf16:
        out["mixed_precision_training"] = "bf16" if a.bf16 else "fp16 with dynamic loss scaling"
    if a.label_smoothing_factor:
        out["label_smoothing_factor"] = a.label_smoothing_factor
    return out


def _model_index(name: str, tasks: list[str], datasets: list[str], dataset_tags: list[str], dataset_args: list,
                 results: dict | None) -> list[dict]:
    """One result per (task, dataset) pair; the Hub rejects results without task, dataset and metrics."""
    metrics = [{"name": key, "type": key.lower().replace(" ", "_"), "value": value}
               for key, value in (results or {}).items() if key.lower().replace(" ", "_") in METRIC_TAGS]
    entries = []
    for task in (t for t in tasks if t in TASK_NAMES):
        for i, tag in enumerate(dataset_tags):
            dataset = {"name": datasets[i] if i < len(datasets) else tag, "type": tag}
            if i < len(dataset_args) and dataset_args[i] is not None:
                dataset["args"] = dataset_args[i]
            if metrics:
                entries.append({"task": {"name": TASK_NAMES[task], "type": task}, "dataset": dataset,
                                "metrics": metrics})
    return [{"name": name, "results": entries}]


def model_card(trainer: Any, language: Any = None, license: str | None = None, tags: Any = None,
               model_name: str | None = None, finetuned_from: str | None = None, tasks: Any = None,
               dataset_tags: Any = None, dataset: Any = None, dataset_args: Any = None) -> str:
    """The card's text (see the module docstring); `create_model_card` writes it."""
    name = model_name or os.path.basename(os.path.normpath(trainer.args.output_dir)) or finetuned_from or "model"
    tags = _as_list(tags)
    tags += [t for t in ("generated_from_trainer", "jtrain") if t not in tags]
    tasks = _as_list(tasks) or ([TASK_TAGS[trainer.model.task]] if trainer.model.task in TASK_TAGS else [])
    dataset_tags = _as_list(dataset_tags)
    datasets = _as_list(dataset) or dataset_tags
    rows, results = evaluation_history(trainer.state.log_history)
    metadata: dict[str, Any] = {"library_name": "transformers"}
    if language:
        metadata["language"] = _as_list(language)
    if license:
        metadata["license"] = license
    on_hub = bool(finetuned_from) and not os.path.isdir(finetuned_from)  # a local checkpoint is no Hub id
    if on_hub:
        metadata["base_model"] = finetuned_from
    metadata["tags"] = tags
    if dataset_tags:
        metadata["datasets"] = dataset_tags
    index = _model_index(name, tasks, datasets, dataset_tags, _as_list(dataset_args), results)
    metric_types = [m["type"] for entry in index[0]["results"][:1] for m in entry["metrics"]]
    if metric_types:
        metadata["metrics"] = metric_types
    metadata["model-index"] = index
    text = f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n\n"
    text += ("<!-- Written by jtrain's Trainer.create_model_card from the training run; edit it to describe "
             "the model. -->\n\n")
    origin = ("trained from scratch" if not finetuned_from else
              f"a fine-tuned version of [{finetuned_from}](https://huggingface.co/{finetuned_from})" if on_hub else
              f"a fine-tuned version of `{finetuned_from}`")
    on = ("an unknown dataset" if not datasets else f"the {datasets[0]} dataset" if len(datasets) == 1
          else ", ".join(f"the {d}" for d in datasets[:-1]) + f" and the {datasets[-1]} datasets")
    text += f"# {name}\n\nThis model is {origin} on {on}, with jtrain (JAX).\n"
    if results:
        text += "It achieves the following results on the evaluation set:\n"
        text += "".join(f"- {key}: {_rounded(value)}\n" for key, value in results.items())
    for section in ("Model description", "Intended uses & limitations", "Training and evaluation data"):
        text += f"\n## {section}\n\nMore information needed\n"
    text += "\n## Training procedure\n\n### Training hyperparameters\n\nThe following hyperparameters were used " \
            "during training:\n"
    text += "".join(f"- {key}: {value}\n" for key, value in hyperparameters(trainer).items())
    if rows:
        text += "\n### Training results\n\n" + markdown_table(rows)
    text += "\n### Framework versions\n\n" + "".join(f"- {n} {v}\n" for n, v in _versions())
    return text


def _versions() -> list[tuple[str, str]]:
    import flax
    import jax
    import optax

    from jtrain.version import __version__

    found = [("jtrain", __version__), ("JAX", jax.__version__), ("Flax", flax.__version__),
             ("Optax", optax.__version__)]
    for name, module in (("Datasets", "datasets"), ("Tokenizers", "tokenizers")):
        try:
            found.append((name, __import__(module).__version__))
        except ImportError:
            pass
    return found


def create_model_card(self: Any, language: Any = None, license: str | None = None, tags: Any = None,
                      model_name: str | None = None, finetuned_from: str | None = None, tasks: Any = None,
                      dataset_tags: Any = None, dataset: Any = None, dataset_args: Any = None) -> None:
    """Write `{output_dir}/README.md` (process zero only), as HF's `Trainer.create_model_card`."""
    if not self.is_world_process_zero():
        return
    text = model_card(self, language, license, tags, model_name, finetuned_from, tasks, dataset_tags, dataset,
                      dataset_args)
    os.makedirs(self.args.output_dir, exist_ok=True)

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(os.path.join(self.args.output_dir, "README.md"), write)
