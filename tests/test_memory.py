"""Memory: remat policies change nothing but memory, the train step is planned on abstract inputs
before step 1 (refused when it does not fit, shrunk with auto_find_batch_size), and HF-style
memory metrics come out per phase."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain.args import TrainingArguments
from jtrain.data.loader import ArrayDataset
from jtrain.errors import ConfigError
from jtrain.losses import causal_lm_loss
from jtrain.memory import largest_fitting, remat_policy_from_args
from jtrain.trainer import Trainer
from tests.tiny import lm_rows, padded_lm_batch, tiny_llama


def _loss_and_grads(model, params, batch):
    def loss(p):
        out = causal_lm_loss(model.apply(p, batch), batch)
        return out.loss_sum / out.weight, model.apply(p, batch)["logits"]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


# The policies the issue names; the others in REMAT_POLICIES go through the same nn.remat call.
@pytest.mark.parametrize("policy", ["full", "dots_saveable", "nothing_saveable"])
def test_remat_policy_keeps_outputs_and_gradients(policy):
    plain = tiny_llama()
    params = plain.init(jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in padded_lm_batch(2, 8).items()}
    (loss0, logits0), grads0 = _loss_and_grads(plain, params, batch)
    remat = tiny_llama().with_options(remat_policy=remat_policy_from_args(True, {"policy": policy}))
    (loss1, logits1), grads1 = _loss_and_grads(remat, params, batch)
    # 1e-6: remat recomputes the same float32 ops; only XLA's fusion of them may differ, which can
    # move the last bit or two (float32 eps is 1.2e-7), never more.
    np.testing.assert_allclose(logits1, logits0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_args_map_to_a_policy():
    assert remat_policy_from_args(False, None) is None
    assert remat_policy_from_args(True, None) == "full"  # HF recomputes each whole layer
    assert remat_policy_from_args(True, {"use_reentrant": False}) == "full"  # a torch-only option
    assert remat_policy_from_args(True, {"policy": "dots_saveable"}) == "dots_saveable"
    with pytest.raises(ConfigError, match="policy 'dots' is unknown"):
        remat_policy_from_args(True, {"policy": "dots"})
    with pytest.raises(ConfigError, match=r"unknown gradient_checkpointing_kwargs \['preserve'\]"):
        remat_policy_from_args(True, {"preserve": True})


def test_activation_checkpointing_is_transformers_5s_name_for_gradient_checkpointing(tmp_path):
    """transformers 5 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs) and
    kept the old names as aliases: either name sets both (also through `replace` and a config mapping),
    two different values are refused."""
    new = TrainingArguments(output_dir=str(tmp_path), activation_checkpointing=True,
                            activation_checkpointing_kwargs={"policy": "dots_saveable"})
    assert new.gradient_checkpointing is True and new.gradient_checkpointing_kwargs == {"policy": "dots_saveable"}
    old = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True)
    assert old.activation_checkpointing is True
    assert TrainingArguments(output_dir=str(tmp_path)).activation_checkpointing is False
    assert old.replace(gradient_checkpointing=False).activation_checkpointing is False
    assert old.replace(activation_checkpointing=False).gradient_checkpointing is False
    assert TrainingArguments.from_dict({"output_dir": "o", "activation_checkpointing": "true"}).gradient_checkpointing
    with pytest.raises(ConfigError, match="`activation_checkpointing`=False and its older name "
                                          "`gradient_checkpointing`=True disagree"):
        TrainingArguments(output_dir=str(tmp_path), activation_checkpointing=False, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="policy 'dots' is unknown"):
        TrainingArguments(output_dir=str(tmp_path), activation_checkpointing_kwargs={"policy": "dots"})


def test_largest_fitting_matches_a_linear_scan():
    for start in range(1, 20):
        for limit in range(25):
            probes = []
            fits = lambda n: probes.append(n) or n <= limit
            expected = max([n for n in range(1, start + 1) if n <= limit], default=None)
            assert largest_fitting(fits, start) == expected
            assert len(probes) <= 1 + max(1, start).bit_length()


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, save_strategy="no",
                disable_tqdm=True, logging_steps=100, mesh_shape={"data": 1})
    return TrainingArguments(**{**base, **kw})


def _dataset():
    return ArrayDataset(lm_rows(32, 16))


def test_a_step_that_does_not_fit_is_refused_before_any_state_exists(tmp_path):
    trainer = Trainer(tiny_llama(), _args(tmp_path, max_device_memory_bytes=100_000), train_dataset=_dataset())
    with pytest.raises(ConfigError) as err:
        trainer.train()
    text = str(err.value)
    assert "per device" in text and "max_device_memory_bytes" in text and "97.66 KiB" in text
    for advice in ("per_device_train_batch_size (now 8)", "gradient_checkpointing", "fsdp=full_shard",
                   "auto_find_batch_size"):
        assert advice in text
    assert trainer.train_state is None  # refused before the state was allocated


def test_auto_find_batch_size_picks_the_largest_batch_that_fits(tmp_path):
    probe = Trainer(tiny_llama(), _args(tmp_path / "probe"), train_dataset=_dataset())
    loader, _ = probe._plan()
    probe._setup(2, train_loader=loader)
    est8 = probe._step_plan.estimate
    # A budget that batch 8 exceeds: the state's arguments plus about half of batch 8's activations.
    budget = est8.peak - est8.temporaries // 2
    auto = Trainer(tiny_llama(), _args(tmp_path / "auto", auto_find_batch_size=True, max_device_memory_bytes=budget),
                   train_dataset=_dataset())
    out = auto.train()
    plan, found = auto._step_plan, auto.args.per_device_train_batch_size  # as HF: args hold the batch used
    assert 1 <= found < 8 and plan.per_device_batch == found
    # The largest that fits: its estimate is within the budget, one row more is not.
    assert plan.probes[found].peak <= budget < plan.probes[found + 1].peak
    assert plan.probes[8].peak == est8.peak
    assert auto.state.train_batch_size == found  # global batch = per-device x devices (1) x accumulation (1)
    assert auto.steps.compile_log.counts["train"] == 1  # the chosen batch compiled once for the run
    assert np.isfinite(out.training_loss)


@pytest.mark.cpu_only("a CPU reports no memory statistics, so the device peak is the compiler's estimate")
def test_memory_metrics_per_phase(tmp_path):
    trainer = Trainer(tiny_llama(), _args(tmp_path, skip_memory_metrics=False), train_dataset=_dataset(),
                      eval_dataset=ArrayDataset(lm_rows(8, 16, seed=3)))
    metrics = trainer.train().metrics
    for phase in ("init", "train"):
        for key in ("mem_cpu_alloc_delta", "mem_cpu_peaked_delta", "mem_device_alloc_delta"):
            assert isinstance(metrics[f"{phase}_{key}"], int)
    # CPU reports no memory statistics, so the device peak is the compiler's estimate, and says so.
    assert jax.devices()[0].memory_stats() is None
    assert metrics["train_mem_device_peak_estimate"] == trainer._step_plan.estimate.peak > 0
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.train_state))
    # The init phase allocated the state on the one device of the mesh (plus a few scalars).
    assert state_bytes <= metrics["init_mem_device_alloc_delta"] <= state_bytes + 4096
    assert metrics["train_mem_device_peak_estimate"] >= state_bytes  # the step holds the state at least
    eval_metrics = trainer.evaluate()
    assert 0 < eval_metrics["eval_mem_device_peak_estimate"] < metrics["train_mem_device_peak_estimate"]
    assert isinstance(eval_metrics["eval_mem_cpu_alloc_delta"], int)


def _two_length_rows():
    """16 short rows (8 tokens) first, then 16 long ones (40): with buckets (16, 64) the first batch
    is padded to 16 tokens and the later ones to 64."""
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(1, 64, size=8 if i < 16 else 40).tolist()} for i in range(32)]


def test_memory_is_planned_at_the_longest_padded_length(tmp_path):
    """A budget that the first (short) batch fits but the longest bucket does not: refused before any
    state exists, and auto_find_batch_size picks a batch that fits the longest rows."""
    from jtrain.data.collators import DataCollatorForLanguageModeling
    from jtrain.memory import MemoryEstimate

    collator = DataCollatorForLanguageModeling(pad_token_id=0, mlm=False, length_buckets=(16, 64))
    kw = dict(train_sampling_strategy="sequential", remove_unused_columns=False)
    probe = Trainer(tiny_llama(), _args(tmp_path / "probe", **kw), data_collator=collator,
                    train_dataset=_two_length_rows())
    loader, _ = probe._plan()
    probe._setup(2, train_loader=loader)
    assert loader.shape_probe()["input_ids"].shape[-1] == 16  # the first batch is short
    short = MemoryEstimate.from_compiled(probe._step_plan.compiled)  # the first batch's executable
    long = probe._step_plan.estimate  # what the plan decided on
    assert long.peak > short.peak
    budget = (short.peak + long.peak) // 2
    refused = Trainer(tiny_llama(), _args(tmp_path / "refused", max_device_memory_bytes=budget, **kw),
                      data_collator=collator, train_dataset=_two_length_rows())
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        refused.train()
    assert refused.train_state is None
    auto = Trainer(tiny_llama(), _args(tmp_path / "auto", max_device_memory_bytes=budget, auto_find_batch_size=True,
                                       **kw), data_collator=collator, train_dataset=_two_length_rows())
    out = auto.train()
    found = auto.args.per_device_train_batch_size
    assert 1 <= found < 8 and auto._step_plan.probes[found].peak <= budget
    assert np.isfinite(out.training_loss)


def test_a_compile_failing_inside_cudnn_attention_names_the_option_that_avoids_it(tmp_path, monkeypatch):
    """Some GPUs or drivers lack a cuDNN attention engine that JAX's tracing-time checks allow; XLA then
    fails while compiling the step. The planner compiles before any state exists, so that failure
    becomes a ConfigError naming attention_impl, and other compile errors pass through unchanged."""
    def failing_compile(message):
        def compile(self, *args, **kwargs):
            raise jax.errors.JaxRuntimeError(message)
        return compile

    cudnn = "INTERNAL: cuDNN error: No valid engine configs for __cudnn$fmhaSoftmax\nmore detail"
    monkeypatch.setattr(jax.stages.Lowered, "compile", failing_compile(cudnn))
    trainer = Trainer(tiny_llama(), _args(tmp_path), train_dataset=_dataset())
    with pytest.raises(ConfigError, match=r"failed in cuDNN's fused attention \(INTERNAL: cuDNN error: No valid "
                                          r"engine configs for __cudnn\$fmhaSoftmax\)\. Set the model option "
                                          r"attention_impl: xla"):
        trainer.train()
    assert trainer.train_state is None
    # JAX's cuDNN partitioner refusing a sharding it cannot split (it runs inside XLA's compile)
    monkeypatch.setattr(jax.stages.Lowered, "compile",
                        failing_compile("INTERNAL: ValueError: Query, key and value should have same sharding."))
    with pytest.raises(ConfigError, match=r"Query, key and value should have same sharding\.\)\. Set the model "
                                          r"option attention_impl: xla"):
        Trainer(tiny_llama(), _args(tmp_path / "gqa"), train_dataset=_dataset()).train()
    monkeypatch.setattr(jax.stages.Lowered, "compile", failing_compile("RESOURCE_EXHAUSTED: out of memory"))
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        Trainer(tiny_llama(), _args(tmp_path / "other"), train_dataset=_dataset()).train()
