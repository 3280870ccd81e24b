"""HF's `TrainingArguments` setters and helpers against HF's own: the same calls must leave every
field both classes have with the same value (jtrain's return a new, validated instance)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import pytest
import transformers

from jtrain import TrainingArguments
from jtrain.errors import ConfigError

CALLS = [
    ("set_training", dict(learning_rate=1e-4, batch_size=32, weight_decay=0.1, num_epochs=2, max_steps=50,
                          gradient_accumulation_steps=4, seed=7, activation_checkpointing=True)),
    ("set_evaluate", dict(strategy="steps", steps=100, batch_size=16, accumulation_steps=2, delay=3, loss_only=True)),
    ("set_testing", dict(batch_size=12, loss_only=True)),
    ("set_save", dict(strategy="epoch", steps=30, total_limit=2)),
    ("set_logging", dict(strategy="steps", steps=7, report_to="tensorboard", level="info", first_step=True,
                         nan_inf_filter=True, replica_level="error")),
    ("set_optimizer", dict(name="adafactor", learning_rate=3e-3, weight_decay=0.01, beta1=0.8, beta2=0.99,
                           epsilon=1e-6, args="scale_parameter=False")),
    ("set_lr_scheduler", dict(name="cosine", num_epochs=5, max_steps=40, warmup_steps=0.1)),
    ("set_dataloader", dict(train_batch_size=16, eval_batch_size=64, drop_last=True, num_workers=2,
                            prefetch_factor=3, auto_find_batch_size=True, ignore_data_skip=True, sampler_seed=3)),
]


def _hf_args(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")


@pytest.mark.parametrize("name,kwargs", CALLS, ids=[c[0] for c in CALLS])
def test_setters_leave_the_fields_hfs_leave(name, kwargs, tmp_path):
    """Every shared field that the call changes on either side ends with the same value on both."""
    hf_before = _hf_args(tmp_path)
    theirs = getattr(_hf_args(tmp_path), name)(**kwargs)
    before = TrainingArguments(str(tmp_path), report_to=["none"])
    ours = getattr(before, name)(**kwargs)
    shared = {f.name for f in dataclasses.fields(ours)} & {f.name for f in dataclasses.fields(theirs)}
    compared = 0
    for field in sorted(shared):
        mine, hf = getattr(ours, field), _plain(getattr(theirs, field))
        if mine == getattr(before, field) and hf == _plain(getattr(hf_before, field)):
            continue  # untouched by the call on both sides (defaults may be spelled differently: '' vs None)
        if field == "report_to" and isinstance(hf, str):
            hf = [hf]  # HF's setter skips the str -> list its __post_init__ does; jtrain always holds a list
        assert mine == hf, f"{name}: {field} is {mine!r} here, {hf!r} in HF"
        compared += 1
    assert compared >= 2  # the call changed fields this test compared, so it can fail
    assert ours is not before and before == TrainingArguments(str(tmp_path), report_to=["none"])  # frozen


def _plain(value):
    """HF's enums (IntervalStrategy, OptimizerNames, SchedulerType) as their strings."""
    if isinstance(value, list):
        return [getattr(v, "value", v) for v in value]
    return getattr(value, "value", value)


def test_helpers_match_hfs(tmp_path):
    ours = TrainingArguments(str(tmp_path), warmup_steps=0.1, per_device_train_batch_size=4,
                             per_device_eval_batch_size=2, mesh_shape={"data": 1})
    theirs = _hf_args(tmp_path).set_lr_scheduler(warmup_steps=0.1)
    assert ours.get_warmup_steps(95) == theirs.get_warmup_steps(95) == 10
    assert (ours.train_batch_size, ours.eval_batch_size) == (4, 2)  # one data-parallel device on this mesh
    assert TrainingArguments(str(tmp_path), per_device_train_batch_size=4, mesh_shape={"data": 4, "tensor": 2}
                             ).train_batch_size == 16  # tensor-parallel devices hold no extra rows
    assert json.loads(ours.to_json_string())["warmup_steps"] == 0.1
    sanitized = ours.to_sanitized_dict()
    assert sanitized["train_batch_size"] == 4 and sanitized["mesh_shape"] == "{'data': 1}"
    assert all(type(v) in (bool, int, float, str) for v in sanitized.values())


def test_setter_values_are_validated_and_push_to_hub_is_refused(tmp_path):
    args = TrainingArguments(str(tmp_path))
    with pytest.raises(ConfigError, match="eval_strategy"):
        args.set_evaluate(strategy="sometimes")
    with pytest.raises(ConfigError, match="positive `steps`"):
        args.set_logging(strategy="steps", steps=0)
    with pytest.raises(ConfigError, match="never uploads"):
        args.set_push_to_hub("me/model")


def test_values_are_read_by_their_fields_type_as_in_a_config_file(tmp_path):
    """TrainingArguments(**yaml.safe_load(text)) is common, and PyYAML reads `3e-4` (no dot) as a
    string: each value is read by its field's type (jtrain.coerce, as the run config's are), so the
    optimizer gets a float; a value that cannot be read names the field. HF's dataclass keeps the
    string, and its optimizer fails inside torch."""
    import pathlib

    import yaml

    values = yaml.safe_load("learning_rate: 3e-4\nnum_train_epochs: '2'\nbf16: 'false'\nreport_to: none\n")
    assert values["learning_rate"] == "3e-4"  # the PyYAML behaviour this guards against
    args = TrainingArguments(output_dir=pathlib.Path(tmp_path), **values)
    assert (args.learning_rate, args.num_train_epochs, args.bf16, args.report_to) == (3e-4, 2.0, False, [])
    assert type(args.learning_rate) is float and args.output_dir == str(tmp_path)
    assert TrainingArguments(str(tmp_path), disable_tqdm=None).disable_tqdm is None  # None as HF passes it
    with pytest.raises(ConfigError, match=r"`learning_rate`: expected float, got 'fast'"):
        TrainingArguments(str(tmp_path), learning_rate="fast")
    with pytest.raises(ConfigError, match=r"`per_device_train_batch_size`: expected int, got 2.5"):
        TrainingArguments(str(tmp_path), per_device_train_batch_size=2.5)


LOAD_BEST = [  # (what the arguments say, whether HF's TrainingArguments accepts them)
    (dict(eval_strategy="steps", save_strategy="epoch"), False),
    (dict(eval_strategy="epoch", save_strategy="steps"), False),
    (dict(eval_strategy="steps", save_strategy="best", metric_for_best_model="loss"), True),
    (dict(eval_strategy="steps", eval_steps=10, save_steps=30), True),
    (dict(eval_strategy="steps", eval_steps=10, save_steps=25), False),
    (dict(eval_strategy="steps", logging_steps=7, save_steps=21), True),  # eval_steps defaults to logging_steps
    (dict(eval_strategy="steps", logging_steps=7, save_steps=20), False),
    (dict(eval_strategy="steps", eval_steps=0.1, save_steps=30), False),  # a ratio and a number of updates
    (dict(eval_strategy="epoch", save_strategy="epoch"), True),
]


@pytest.mark.parametrize("kwargs,accepted", LOAD_BEST, ids=[str(i) for i in range(len(LOAD_BEST))])
def test_load_best_model_at_end_is_checked_when_the_arguments_are_built_as_hfs(kwargs, accepted, tmp_path):
    """HF refuses strategies under which an evaluation may not be followed by a save at construction;
    jtrain did only once train() started, after the model was built and the data loaded. (Two ratios are
    compared once train() resolves them into numbers of updates.)"""
    kwargs = dict(load_best_model_at_end=True, **kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", **kwargs)
        hf_accepts = True
    except ValueError:
        hf_accepts = False
    assert hf_accepts == accepted
    if accepted:
        TrainingArguments(str(tmp_path), **kwargs)
    else:
        with pytest.raises(ConfigError, match="load_best_model_at_end"):
            TrainingArguments(str(tmp_path), **kwargs)


def test_hfs_pytorch_and_hub_options_are_read_back_as_hfs_or_refused_with_the_fix(tmp_path, caplog):
    """Code ported from HF passes torch and Hub options (`push_to_hub=False`, `dataloader_pin_memory=False`,
    `torch_compile=True`) and reads them back (`if training_args.push_to_hub:`): each is accepted and read back as
    HF's TrainingArguments reads it, one warning names those with no effect set away from HF's default, and the
    four that ask for what jtrain does not do are refused when switched on, each with the fix. Python's bare
    TypeError (and then a refusal of every such option, `push_to_hub=False` included) stopped ported code."""
    import logging

    from jtrain.config import build_config
    from jtrain.hf_only_args import HF_ONLY_FIELDS

    hf_fields = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    ours = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert set(HF_ONLY_FIELDS) == set(hf_fields) - ours  # the table follows the installed transformers
    assert {key: field.default for key, field in HF_ONLY_FIELDS.items()} == \
        {key: hf_fields[key].default for key in HF_ONLY_FIELDS}
    ported = dict(push_to_hub=False, dataloader_pin_memory=False, torch_compile=True, ddp_find_unused_parameters=False,
                  hub_model_id="me/model", ddp_timeout=60)
    with caplog.at_level(logging.WARNING, logger="jtrain.hf_only_args"):
        args = TrainingArguments(str(tmp_path), report_to="none", **ported)
    hf = transformers.TrainingArguments(str(tmp_path / "hf"), report_to="none", **ported)
    objects_in_hf = {"accelerator_config", "torch_compile_backend", "debug"}  # HF's __post_init__ builds these
    assert {key: getattr(args, key) for key in HF_ONLY_FIELDS if key not in objects_in_hf} == \
        {key: getattr(hf, key) for key in HF_ONLY_FIELDS if key not in objects_in_hf}
    assert args.replace(learning_rate=1e-3).torch_compile is True  # carried through replace()
    # jtrain's own records only: HF's TrainingArguments(torch_compile=True) logs its own warning, which reaches
    # caplog whenever an earlier test in the worker turned on transformers' log propagation (the last CI run)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("jtrain")]
    assert len(warned) == 1 and "no effect in jtrain" in warned[0]
    for key in ("dataloader_pin_memory", "torch_compile", "ddp_find_unused_parameters", "hub_model_id", "ddp_timeout"):
        assert f"`{key}`" in warned[0]
    assert "push_to_hub" not in warned[0]  # at HF's default: nothing to say
    with pytest.raises(ConfigError) as err:
        TrainingArguments(str(tmp_path), push_to_hub=True, deepspeed="ds_config.json", learnng_rate=1e-3)
    assert "unknown key `learnng_rate` (did you mean `learning_rate`?)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        TrainingArguments(str(tmp_path), push_to_hub=True, deepspeed="ds_config.json")
    assert "`push_to_hub=True`: jtrain never uploads; upload `output_dir`" in str(err.value)
    assert "`deepspeed='ds_config.json'`: DeepSpeed is PyTorch's; jtrain's ZeRO-style sharding" in str(err.value)
    built = build_config({"training": {"output_dir": str(tmp_path), "push_to_hub": "false", "ddp_bucket_cap_mb": "25",
                                       "hub_model_id": "me/model"}}).training  # a config file's strings, typed
    assert (built.push_to_hub, built.ddp_bucket_cap_mb, built.hub_model_id) == (False, 25, "me/model")
    with pytest.raises(ConfigError, match=r"`push_to_hub=True`: jtrain never uploads"):
        build_config({"training": {"output_dir": str(tmp_path), "push_to_hub": "true"}})
    with pytest.raises(AttributeError, match="no attribute 'no_such_option'"):
        args.no_such_option
    assert TrainingArguments(str(tmp_path), learning_rate=1e-3).learning_rate == 1e-3  # known keys pass as before


def test_hfs_properties_are_there_for_the_start_up_line_of_hfs_scripts(tmp_path):
    """Every HF example script logs `training_args.device`, `n_gpu`, `parallel_mode.value` and `fp16`
    at start-up; those reads failed. Every public member of HF's TrainingArguments that is not a field
    exists, except two torch internals."""
    import inspect

    torch_only = {"place_model_on_device", "is_torch_greater_or_equal_than_2_8"}
    hf_fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    members = {name for name, _ in inspect.getmembers(transformers.TrainingArguments)
               if not name.startswith("_") and name not in hf_fields}
    args = TrainingArguments(str(tmp_path), ddp_timeout=90)
    assert [name for name in sorted(members - torch_only) if not hasattr(args, name)] == []
    line = (f"Process rank: {args.local_process_index}, device: {args.device}, n_gpu: {args.n_gpu}, "
            f"distributed training: {args.parallel_mode.value == 'distributed'}, 16-bits training: {args.fp16}")
    assert line == f"Process rank: 0, device: {jax.local_devices()[0]}, n_gpu: 0, distributed training: False, " \
                   "16-bits training: False"
    assert args.parallel_mode.value == ("not_distributed" if jax.local_device_count() > 1 else "not_parallel")
    assert args.ddp_timeout_delta.total_seconds() == 90 and args.default_optim == args.optim == "adamw_torch"


HF_COMMAND_LINE = ["--output_dir", "out", "--learning_rate", "3e-4", "--logging_steps", "10", "--warmup_steps", "0.1",
                   "--eval_strategy", "steps", "--eval_steps", "20", "--lr_scheduler_type", "cosine",
                   "--lr_scheduler_kwargs", '{"num_cycles": 2}', "--report_to", "none", "--bf16", "--save_steps", "40"]


def test_hfs_argument_parser_reads_jtrains_training_arguments(tmp_path):
    """HF's example scripts parse `(ModelArguments, DataTrainingArguments, TrainingArguments)` with
    HfArgumentParser; with jtrain's class swapped in, it refused to build (`int | float` fields; dict fields
    that argparse called dict() on). The shared fields now read as HF's own class reads them."""
    ours = transformers.HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        HF_COMMAND_LINE + ["--mesh_shape", "{data: 1}"])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.HfArgumentParser(transformers.TrainingArguments).parse_args_into_dataclasses(
            HF_COMMAND_LINE + ["--use_cpu"])[0]
    for name in ("learning_rate", "logging_steps", "warmup_steps", "eval_steps", "save_steps", "lr_scheduler_kwargs",
                 "report_to", "bf16"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.lr_scheduler_type, ours.eval_strategy) == ("cosine", "steps") and ours.mesh_shape == {"data": 1}
    assert isinstance(ours.logging_steps, int) and isinstance(ours.warmup_steps, float)  # a count, a ratio
    with pytest.raises(ConfigError, match="`logging_steps` 2.5: a value >= 1 is a number of updates"):
        TrainingArguments(output_dir=str(tmp_path), logging_steps=2.5)
    with pytest.raises(ConfigError, match="`mesh_shape`: expected a mapping"):
        TrainingArguments(output_dir=str(tmp_path), mesh_shape="data=2")


def test_hfs_own_training_arguments_are_read_into_jtrains():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.HfArgumentParser(transformers.TrainingArguments).parse_args_into_dataclasses(
            HF_COMMAND_LINE + ["--use_cpu"])[0]
    ours = TrainingArguments.from_hf(theirs)
    for name in ("output_dir", "learning_rate", "logging_steps", "warmup_steps", "eval_steps", "save_steps",
                 "lr_scheduler_kwargs", "bf16", "use_cpu", "per_device_train_batch_size"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_optim_target_modules_keeps_hfs_string_meaning(tmp_path):
    """HF's optim_target_modules is a list of names, or one string: a regex or 'all-linear'. jtrain read the string
    as a comma-separated list (['all-linear']), which GaLore/APOLLO then matched as a module name: "No target
    modules found" for the most common value. A string is one value unless written as a list."""
    from jtrain.config import load_config

    assert TrainingArguments(output_dir=str(tmp_path), optim_target_modules="all-linear").optim_target_modules == \
        "all-linear"
    for text, value in (("all-linear", "all-linear"), (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
                        ("[attn, mlp]", ["attn", "mlp"])):
        cfg = load_config(None, {"output_dir": str(tmp_path), "optim_target_modules": text})
        assert cfg.training.optim_target_modules == value, text
