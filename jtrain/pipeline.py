"""The main job behind `python -m jtrain.run` (and the HF-style scripts): config -> data -> model ->
Trainer -> files.

One code path for every task (clm, classification, mlm, sft); a task only chooses its data
builder and its model head. Everything that can be checked (model directory, tokenizer, columns,
labels, lengths) is checked before the first file is written. Each evaluated split is printed
beside the baseline its task defines, so a result says whether the model learned anything.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from jtrain.config import RunConfig
from jtrain.data import classification, mlm, sft, text_lm
from jtrain.data.local_tokenizers import (ENCODER_TYPES, model_token_ids, position_limit, resolve_tokenizer,
                                         save_tokenizer, train_tokenizer_for)
from jtrain.data.task_data import TaskData, TokenizerFactory
from jtrain.errors import ConfigError
from jtrain.jsonfile import read_json_object
from jtrain.models import SUPPORTED_MODEL_TYPES, architecture, create_model, from_pretrained, param_count, read_config
from jtrain.models.hub import checkpoint_dir
from jtrain.models.wrapper import innermost
from jtrain.output_dir import clear_previous_run, resume_point, search_output_dir
from jtrain.trainer import Trainer
from jtrain.xla_flags import apply_backend_choices

TOKENIZER_FILE = "tokenizer.json"
MODEL_TASK = {"clm": "causal_lm", "sft": "causal_lm", "classification": "sequence_classification",
              "mlm": "masked_lm"}


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[jtrain] {message}", flush=True)


# ---- model source --------------------------------------------------------------------------
def model_spec(cfg: RunConfig) -> tuple[str, dict]:
    """(model_type, config.json fields) of the model to build or load; checks the directories first."""
    m = cfg.model
    if m.model_name_or_path:
        return _typed(read_config(checkpoint_dir(m.model_name_or_path)))
    if m.config_name:
        directory = m.config_name if os.path.isdir(m.config_name) else os.path.dirname(m.config_name) or "."
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise ConfigError(f"`model.config_name` {m.config_name!r}: no config.json there (jtrain never downloads; "
                              "point it at a local config.json or the directory holding one)")
        model_type, config = _typed(read_config(directory))
        return model_type, {**config, **m.config}
    return m.model_type, dict(m.config)


def _typed(config: dict) -> tuple[str, dict]:
    return config["model_type"], config


def check_head(task: str, model_type: str) -> None:
    """The data task needs a head the architecture has (checked before any data is read)."""
    head = MODEL_TASK[task]
    if head not in architecture(model_type).heads:
        able = [t for t in SUPPORTED_MODEL_TYPES if head in architecture(t).heads]
        raise ConfigError(f"data.task {task!r} needs a {head} model, which {model_type!r} has not; use one of "
                          f"{', '.join(able)}")


def known_labels(config: dict) -> list[str] | None:
    """A pretrained classifier's own label names (None when they are HF's LABEL_i defaults)."""
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return None if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


# ---- data ------------------------------------------------------------------------------------
def tokenizer_factory(cfg: RunConfig, model_type: str, resuming: bool = False) -> TokenizerFactory:
    """The configured tokenizer (or the model directory's), else one trained on the training texts.

    A resumed run reuses the tokenizer its first run saved in output_dir: retraining on other text (another
    sample, an edited corpus), or with another jtrain (local_tokenizers' WordPiece training was made
    reproducible in place of tokenizers' own, huggingface/tokenizers#1794), would give other ids.
    """
    fixed = resolve_tokenizer(cfg.tokenizer.tokenizer_name, cfg.model.model_name_or_path)
    saved = os.path.join(cfg.training.output_dir, TOKENIZER_FILE)
    if fixed is None and resuming and os.path.isfile(saved):
        fixed = resolve_tokenizer(saved, None)
    t = cfg.tokenizer

    def get(texts: Any) -> Any:
        if fixed is not None:
            return fixed
        return train_tokenizer_for(model_type, texts, vocab_size=t.vocab_size, tokenizer_type=t.tokenizer_type,
                                   lowercase=t.lowercase)

    return get


def wanted_splits(cfg: RunConfig) -> list[str]:
    a = cfg.training
    return [s for s, on in (("train", a.do_train), ("eval", a.do_eval), ("test", a.do_predict)) if on]


def _examples(cfg: RunConfig) -> dict:
    """Raw examples of each needed split: from the standard library, or from the configured files."""
    d, wanted = cfg.data, wanted_splits(cfg)
    readers = {"clm": (text_lm.stdlib_texts, text_lm.file_texts), "mlm": (mlm.stdlib_texts, text_lm.file_texts),
               "classification": (classification.stdlib_examples, classification.file_examples),
               "sft": (sft.stdlib_pairs, sft.file_pairs)}
    from_stdlib, from_files = readers[d.task]
    found = from_stdlib(d) if d.source == "stdlib" else from_files(d, wanted)
    return {split: rows for split, rows in found.items() if split in wanted}


def prepare_data(cfg: RunConfig, model_type: str, model_config: dict, resume: str | None = None) -> TaskData:
    """The task's rows. A resumed run (`resume`: the checkpoint directory) reads them as its first run did:
    with the tokenizer that run saved, and a classifier with the label list its checkpoint holds (another
    jtrain version may order labels otherwise: HF's order, adopted later, puts "10" before "2")."""
    d, a = cfg.data, cfg.training
    examples, get_tokenizer = _examples(cfg), tokenizer_factory(cfg, model_type, resume is not None)
    if d.task == "clm":
        return text_lm.build_clm_data(examples, get_tokenizer, d)
    if d.task == "mlm":
        return mlm.build_mlm_data(examples, get_tokenizer, d, a.resolved_data_seed, a.length_buckets)
    if d.task == "sft":
        return sft.build_sft_data(examples, get_tokenizer, d, length_buckets=a.length_buckets)
    labels = known_labels(model_config) if cfg.model.model_name_or_path else None
    saved = os.path.join(resume, "config.json") if resume else None
    if saved and os.path.isfile(saved):
        labels = known_labels(read_json_object(saved, what="the checkpoint's config.json")) or labels
    return classification.build_classification_data(examples, get_tokenizer, d, length_buckets=a.length_buckets,
                                                    known_labels=labels)


# ---- model -----------------------------------------------------------------------------------
def build_model(cfg: RunConfig, data: TaskData, model_type: str, config: dict) -> tuple[Any, Any]:
    """(Model, params or None): loaded from `model_name_or_path`, else fresh from the config."""
    task = MODEL_TASK[cfg.data.task]
    options = {"scan_layers": cfg.model.scan_layers, "attention_impl": cfg.model.attention_impl,
               "sequence_parallel_attention": cfg.model.sequence_parallel_attention}
    if task == "sequence_classification":
        options.update(data.model_config)
    vocab = data.tokenizer.get_vocab_size()
    if cfg.model.model_name_or_path:
        model, params = from_pretrained(cfg.model.model_name_or_path, task, seed=cfg.training.seed,
                                        ignore_mismatched_sizes=cfg.model.ignore_mismatched_sizes, **options)
        if vocab > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} tokens but the model's vocabulary has "
                              f"{model.config.vocab_size}: use the tokenizer the model was trained with")
    else:
        fields = {**config, **model_token_ids(data.tokenizer, model_type)}
        model, params = create_model(model_type, fields, task, **options), None
    _check_length(cfg, model)
    if cfg.quantization is not None:
        model, params = _quantized(cfg, model, params)
    if cfg.peft is not None:
        model, params = _with_lora(cfg, model, params)
    return model, params


def _quantized(cfg: RunConfig, model: Any, params: Any) -> tuple[Any, Any]:
    """The base's target kernels stored quantised and frozen (QLoRA's base): loaded weights are
    quantised once here, a fresh model's inside its compiled init."""
    from jtrain.quant import QuantizedModel

    q = cfg.quantization
    try:
        qmodel = QuantizedModel(model, q.quant_format(), targets=q.target_modules)
    except ConfigError as err:
        raise ConfigError(f"the `quantization` section does not fit this model: {err} (in the config: "
                          "`quantization.quant_block_size` or `quantization.target_modules`)") from err
    return qmodel, (None if params is None else jax.jit(qmodel.quantize_params)(params))


def _with_lora(cfg: RunConfig, model: Any, params: Any) -> tuple[Any, Any]:
    """LoRA on the loaded (or fresh) model: the base params stay as loaded, adapters start at PEFT's init."""
    from jtrain.peft import apply_lora

    lora = apply_lora(model, cfg.peft.lora_config())
    source = cfg.model.model_name_or_path
    lora = dataclasses.replace(lora, base_model_name_or_path=os.path.abspath(source) if source else None)
    rng = jax.random.fold_in(jax.random.key(cfg.training.seed), 0x10A)
    return lora, (None if params is None else lora.init_from_base(params, rng))


def _check_length(cfg: RunConfig, model: Any) -> None:
    """Encoders (and GPT-2) have learned positions: a longer row would index past the table."""
    if model.config.model_type not in ENCODER_TYPES + ("gpt2",):
        return
    limit = position_limit(model.config)
    length = cfg.data.block_size if cfg.data.task == "clm" else cfg.data.max_seq_length
    if limit is not None and length > limit:
        raise ConfigError(f"rows of {length} tokens exceed the model's {limit} positions: lower "
                          f"{'block_size' if cfg.data.task == 'clm' else 'max_seq_length'} or raise "
                          "max_position_embeddings")


def _mesh_used(mesh: Any) -> dict:
    """The mesh axes that split something (all six axes exist; most are size 1)."""
    return {a: n for a, n in mesh.shape.items() if n > 1} or {"data": 1}


def _param_bytes_line(model: Any, mesh: Any, fsdp: Any) -> str:
    """Parameter bytes held per device under the run's sharding rules (what FSDP/TP/PP buy)."""
    from jtrain.sharding import describe_param_bytes, param_shardings, sharding_rules

    abstract = model.abstract_params()
    shardings = param_shardings(model.logical_axes(), abstract, mesh, sharding_rules(fsdp).params)
    return describe_param_bytes(shardings, abstract, mesh)


def check_peft(cfg: RunConfig) -> None:
    """What LoRA means for the run, said before any data is read."""
    if cfg.peft is None:
        return
    if not cfg.model.model_name_or_path:
        _say("note: LoRA on a freshly initialised model (no model.model_name_or_path): only the adapters train")


def check_quantization(cfg: RunConfig) -> None:
    """What a quantised base means for the run, said before any data is read."""
    if cfg.quantization is None:
        return
    if cfg.peft is None:
        _say("note: a quantised base without a `peft` section: the quantised kernels stay frozen; the norms, "
             "embeddings and the head train")


def _transform_summary(cfg: RunConfig, model: Any) -> str:
    """What the run trains on top of the base: LoRA's share, the quantised base's format."""
    from jtrain.peft import LoraModel

    text = ""
    if cfg.quantization is not None:
        text += f"; base kernels stored as {cfg.quantization.describe()}, frozen"
    if not isinstance(model, LoraModel):
        return text
    trained = sum(int(np.prod(x.shape)) for p, x in _flat(model.abstract_params()) if model.is_trainable(p))
    total = param_count(innermost(model).abstract_params())
    ranks = sorted({t.r for t in model.targets})
    return text + (f"; {'DoRA' if model.lora_config.use_dora else 'LoRA'} r={'/'.join(map(str, ranks))} "
                   f"on {model.module_count} modules: trains {trained / 1e6:.3f}M "
                   f"({100 * trained / total:.2f}% of the base)")


def _flat(tree: Any) -> list:
    from flax import traverse_util

    return list(traverse_util.flatten_dict(tree).items())


# ---- results ---------------------------------------------------------------------------------
def evaluate_split(trainer: Trainer, data: TaskData, split: str) -> dict:
    """Metrics of one split with its baseline beside them (and printed beside them)."""
    dataset = data.splits[split]
    if split == "test" and data.problem_type is not None:
        out = trainer.predict(dataset, metric_key_prefix="test")
        metrics = dict(out.metrics)
        write_predictions(trainer.args.output_dir, out.predictions, data.label_names, data.problem_type)
    else:
        metrics = trainer.evaluate(dataset, metric_key_prefix=split)
    labels = np.asarray(dataset.columns["labels"])
    if not (~np.isnan(labels) if labels.dtype.kind == "f" else labels != -100).any():  # unlabelled: no loss
        metrics = {k: v for k, v in metrics.items() if not k.endswith(("_loss", "_accuracy", "_perplexity"))}
    metrics[f"{split}_samples"] = len(dataset)
    baseline = data.baselines.get(split)
    if baseline is not None:
        metrics.update(baseline.metrics(split))
        _say(baseline.describe(metrics, split))
    return metrics


def write_predictions(output_dir: str, logits: Any, names: list[str] | None,
                      problem_type: str = "single_label_classification") -> str:
    """HF's predict_results.txt: one `index<TAB>prediction` line per test row: the class name, the
    regression output to 3 decimals, or the list of the classes whose logit is above 0 (multi-label)."""
    logits = np.asarray(logits)
    if problem_type == "regression":
        lines = [f"{value:3.3f}" for value in logits.reshape(-1)]
    elif problem_type == "multi_label_classification":
        lines = [str([names[i] for i in np.flatnonzero(row > 0)]) for row in logits]
    else:
        lines = [names[int(p)] for p in logits.argmax(-1)]
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "predict_results.txt")
    with open(path, "w") as fh:
        fh.write("index\tprediction\n")
        fh.writelines(f"{i}\t{line}\n" for i, line in enumerate(lines))
    return path


def run_job(cfg: RunConfig) -> dict:
    """Train, evaluate and predict as configured; returns all results (also in all_results.json)."""
    args = cfg.training
    apply_backend_choices(args.use_cpu, args.full_determinism)  # before the model's params exist
    check_peft(cfg)
    check_quantization(cfg)
    resume = search_output_dir(args) if cfg.hp_search is not None else resume_point(args)
    started = time.perf_counter()
    model_type, config = model_spec(cfg)
    check_head(cfg.data.task, model_type)
    data = prepare_data(cfg, model_type, config, resume=resume)
    if cfg.hp_search is not None:
        _say(f"data: {data.summary}; prepared in {time.perf_counter() - started:.1f}s")
        return _search(cfg, data, lambda: build_model(cfg, data, model_type, config))
    model, params = build_model(cfg, data, model_type, config)
    trainer = Trainer(model, args, data_collator=data.collator, train_dataset=data.train,
                      eval_dataset=data.validation, processing_class=data.tokenizer, params=params,
                      compute_metrics=data.compute_metrics)
    _say(f"data: {data.summary}; prepared in {time.perf_counter() - started:.1f}s")
    source = cfg.model.model_name_or_path or "scratch"
    _say(f"model: {model.config.model_type} {model.task} ({source}), "
         f"{param_count(innermost(model).abstract_params()) / 1e6:.2f}M parameters{_transform_summary(cfg, model)}; "
         f"mesh {_mesh_used(trainer.mesh)} over {jax.device_count()} {jax.devices()[0].platform} device(s)")
    if trainer.mesh.size > 1:
        _say(_param_bytes_line(model, trainer.mesh, args.fsdp))
    if resume:
        _say(f"resuming from {resume}")
    results: dict = {}
    if args.do_train:
        results.update(_train(trainer, data, resume, merged_export=bool(cfg.peft and cfg.peft.save_merged)))
    for split in ("eval", "test"):
        if split in data.splits:
            metrics = evaluate_split(trainer, data, split)
            results.update(metrics)
            trainer.save_metrics(split, metrics, combined=False)
    if results:
        trainer.save_metrics("all", results, combined=False)  # this run's results only: all_results.json
    if args.do_train:  # README.md, as HF's example scripts end (the card lists the evaluations above)
        trainer.create_model_card(finetuned_from=cfg.model.model_name_or_path, dataset=_dataset_name(cfg))
    if results:
        tokenizer = "tokenizer.json + tokenizer_config.json"
        saved = f"adapters (adapter_config.json, adapter_model.safetensors), {tokenizer}" if cfg.peft is not None \
            else f"model (config.json, model.safetensors, {tokenizer})"
        written = ", trainer_state.json and README.md (model card)" if args.do_train else ""
        _say(f"wrote {f'checkpoints, {saved}, ' if args.do_train else ''}"
             f"results{written} to {os.path.abspath(args.output_dir)}")
    return results


def _search(cfg: RunConfig, data: TaskData, model_init: Any) -> dict:
    """HF's hyperparameter_search over the config's space; every trial is ranked on the validation
    split. Returns (and writes to best_run.json) the best run's id, objective and values."""
    from jtrain.hp_search import make_sampler, space_sampler
    from jtrain.jsonfile import write_json

    args, hp = cfg.training, cfg.hp_search
    trainer = Trainer(args=args, data_collator=data.collator, train_dataset=data.train, eval_dataset=data.validation,
                      processing_class=data.tokenizer, model_init=model_init, compute_metrics=data.compute_metrics)
    key = None if hp.metric is None else (hp.metric if hp.metric.startswith("eval_") else f"eval_{hp.metric}")

    def objective(metrics: dict) -> float:
        if key not in metrics:
            raise ConfigError(f"hp_search.metric {hp.metric!r}: the evaluation reports no {key!r}; it reports "
                              f"{', '.join(sorted(metrics))}")
        return float(metrics[key])

    best = trainer.hyperparameter_search(hp_space=space_sampler(hp.space), compute_objective=None if key is None
                                         else objective, n_trials=hp.n_trials, direction=hp.direction,
                                         sampler=make_sampler(hp.sampler, hp.seed, hp.space))
    result = {"best_run_id": best.run_id, "best_objective": best.objective,
              "best_hyperparameters": best.hyperparameters}
    if jax.process_index() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "best_run.json"), result, indent=2)
    _say(f"hyperparameter search: best of {hp.n_trials} trials is run-{best.run_id} ({key or 'objective'} "
         f"{best.objective:.4f}) with {best.hyperparameters}; wrote run-N/ and best_run.json to "
         f"{os.path.abspath(args.output_dir)}")
    return result


def _dataset_name(cfg: RunConfig) -> str:
    """What the model card says the model was trained on."""
    d = cfg.data
    return os.path.basename(d.train_file) if d.source == "files" and d.train_file else f"jtrain {d.source} ({d.task})"


def _train(trainer: Trainer, data: TaskData, resume: Any, merged_export: bool = False) -> dict:
    args = trainer.args
    if resume is None:
        clear_previous_run(args)
    os.makedirs(args.output_dir, exist_ok=True)
    if jax.process_index() == 0:  # now, so that a resumed run tokenizes exactly as this one
        save_tokenizer(data.tokenizer, args.output_dir, innermost(trainer.model).config)
    out = trainer.train(resume_from_checkpoint=resume)
    metrics = {**out.metrics, "train_samples": len(data.train)}
    trainer.save_model(args.output_dir)  # a LoRA run: the adapters only, in PEFT's layout
    if getattr(trainer.model, "lora_config", None) is not None and merged_export:
        merged_dir = os.path.join(args.output_dir, "merged")
        trainer.save_model(merged_dir, merged=True)
        if jax.process_index() == 0:
            save_tokenizer(data.tokenizer, merged_dir, innermost(trainer.model).config)
        _say(f"wrote the base with the adapters merged in (a full HF model) to {os.path.abspath(merged_dir)}")
    trainer.save_state()
    trainer.save_metrics("train", metrics, combined=False)
    return metrics
