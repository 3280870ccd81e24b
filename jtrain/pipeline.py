"""The main job behind `python -m jtrain.run`: config -> data -> model -> Trainer -> files.

Everything that can be checked is checked before the first file is written.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from jtrain.config import RunConfig
from jtrain.data.text_lm import (LMData, build_lm_data, file_splits, load_tokenizer_or_none, perplexity,
                                 stdlib_splits)
from jtrain.data.tokenizer import token_id
from jtrain.errors import ConfigError
from jtrain.models import create_model, param_count
from jtrain.output_dir import clear_previous_run, resume_point
from jtrain.trainer import Trainer


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[jtrain] {message}", flush=True)


def prepare_data(cfg: RunConfig) -> LMData:
    d = cfg.data
    if d.task != "clm":
        raise ConfigError(f"data.task {d.task!r} is not supported by this job; supported: clm")
    if d.source == "stdlib":
        splits = stdlib_splits(d.max_files, d.validation_percent)
    elif d.source == "files":
        splits = file_splits(d.train_file, d.validation_file, d.text_column)
    else:
        raise ConfigError(f"data.source must be 'stdlib' or 'files', got {d.source!r}")
    return build_lm_data(splits, tokenizer=load_tokenizer_or_none(cfg.tokenizer.tokenizer_name),
                         vocab_size=cfg.tokenizer.vocab_size, block_size=d.block_size,
                         max_eval_rows=d.max_eval_rows)


def build_model(cfg: RunConfig, data: LMData) -> Any:
    if cfg.model.model_name_or_path:
        raise ConfigError("loading `model.model_name_or_path` needs the HF checkpoint loader; "
                          "train from scratch with `model.config` instead")
    tok = data.tokenizer
    ids = {"vocab_size": tok.get_vocab_size(), "pad_token_id": token_id(tok, "<pad>"),
           "bos_token_id": token_id(tok, "<s>"), "eos_token_id": token_id(tok, "</s>")}
    return create_model(cfg.model.model_type, {**cfg.model.config, **ids},
                        scan_layers=cfg.model.scan_layers, attention_impl=cfg.model.attention_impl)


def _write_results(output_dir: str, name: str, metrics: dict) -> str:
    path = os.path.join(output_dir, name)
    with open(path, "w") as fh:
        json.dump(metrics, fh, indent=4, sort_keys=True)
        fh.write("\n")
    return path


def run_job(cfg: RunConfig) -> dict:
    """Train and/or evaluate as configured; returns all results (also written to all_results.json)."""
    args = cfg.training
    resume = resume_point(args)
    started = time.perf_counter()
    data = prepare_data(cfg)
    model = build_model(cfg, data)
    trainer = Trainer(model, args, train_dataset=data.train, eval_dataset=data.validation,
                      processing_class=data.tokenizer)
    _say(f"data: {len(data.train)} train rows x {cfg.data.block_size} tokens ({data.train_tokens} tokens), "
         f"{len(data.validation) if data.validation else 0} eval rows; vocab {data.tokenizer.get_vocab_size()}; "
         f"prepared in {time.perf_counter() - started:.1f}s")
    _say(f"model: {cfg.model.model_type}, {param_count(model.abstract_params()) / 1e6:.2f}M parameters; "
         f"mesh {dict(trainer.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s)")
    if resume:
        _say(f"resuming from {resume}")
    results: dict = {}
    if args.do_train:
        if resume is None:
            clear_previous_run(args)
        os.makedirs(args.output_dir, exist_ok=True)
        out = trainer.train(resume_from_checkpoint=resume)
        results.update(out.metrics)
        trainer.save_model(args.output_dir)
        trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
        _write_results(args.output_dir, "train_results.json", out.metrics)
    if args.do_eval and data.validation is not None:
        metrics = trainer.evaluate()
        if data.unigram_baseline is not None:
            metrics["eval_unigram_baseline_loss"] = data.unigram_baseline
            metrics["eval_unigram_baseline_perplexity"] = perplexity(data.unigram_baseline)
        results.update(metrics)
        os.makedirs(args.output_dir, exist_ok=True)
        _write_results(args.output_dir, "eval_results.json", metrics)
        _say(f"eval loss {metrics['eval_loss']:.4f} (perplexity {metrics['eval_perplexity']:.2f}) vs unigram "
             f"baseline {data.unigram_baseline:.4f} (perplexity {perplexity(data.unigram_baseline):.2f})")
    if results:
        _write_results(args.output_dir, "all_results.json", results)
        _say(f"wrote checkpoints, model (config.json, model.safetensors, tokenizer.json), results and "
             f"trainer_state.json to {os.path.abspath(args.output_dir)}")
    return results
