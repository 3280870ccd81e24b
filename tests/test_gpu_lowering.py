"""What the GPU kernels are given, checked without a GPU: the train step cross-lowered for CUDA.

`jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs JAX's CUDA lowering rules on this
CPU machine, so the StableHLO a GPU would compile can be read here: which cuDNN attention kernel
each layer calls and with what mask. Three things stand in for the missing GPU, each only a
question the lowering asks the machine: JAX's cuDNN version and compute-capability checks (set to
cuDNN 9.10 on a Hopper GPU, the H200 of `benchmarks/gpu_1b.py`), and `jax.default_backend()` (set
to "gpu", so the model takes its accelerator paths, as it would when traced on a GPU).

Nothing here runs a kernel: the numbers of the fused kernels are JAX's and NVIDIA's; the tests in
tests/test_attention_masks.py check what jtrain passes against the reference einsum on CPU.
"""

from __future__ import annotations

import collections
import os
import re
import sys
from typing import Any

import jax
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

from jtrain.args import TrainingArguments
from jtrain.errors import ConfigError
from jtrain.flop_count import traced_flops
from jtrain.compiled import build_compiled_steps
from jtrain.models import create_model
from jtrain.precision import policy_from_args
from jtrain.trainer import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_1b  # noqa: E402

_CALL = re.compile(r"stablehlo\.custom_call @([\w$]+)\(")


@pytest.fixture
def as_if_on_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda cc: float(cc) <= 9.0)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


def _cuda_train_step(tmp_path, model, batch: dict[str, np.ndarray], **arg_overrides) -> str:
    """The jtrain Trainer's train step for `batch` (one micro-batch), lowered for CUDA, as text."""
    return _traced_train_step(tmp_path, model, batch, **arg_overrides).lower(lowering_platforms=("cuda",)).as_text()


def _traced_train_step(tmp_path, model, batch: dict[str, np.ndarray], **arg_overrides) -> Any:
    """The jtrain Trainer's train step for `batch` (one micro-batch), traced (`jax.stages.Traced`).

    Built as the Trainer builds it (its optimizer, schedule, loss and precision policy) but from
    abstract shapes only: a 1B model's state is never allocated."""
    args = TrainingArguments(**{**dict(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2,
                                       bf16=True, save_strategy="no", report_to=["none"], disable_tqdm=True,
                                       mesh_shape={"data": 1}), **arg_overrides})
    trainer = Trainer(model, args)
    trainer.create_optimizer_and_scheduler(args.max_steps)
    steps = build_compiled_steps(model, trainer.mesh, trainer.optimizer, trainer.lr_scheduler, trainer.compute_loss,
                                 seed=args.seed, precision=policy_from_args(args))
    abstract = steps.abstract_train_batch({k: v[None] for k, v in batch.items()})
    return steps.train_step.trace(steps.abstract_state, abstract)


def _attention_calls(hlo: str) -> collections.Counter:
    """(kernel, cuDNN mask type, sliding window length) -> number of calls in the lowered step."""
    calls: collections.Counter = collections.Counter()
    for line in hlo.splitlines():
        found = _CALL.search(line)
        if found and found.group(1).startswith("__cudnn$fmha"):
            mask = re.search(r'mask_type\\22: \\22(\w+)', line).group(1)
            window = int(re.search(r'sliding_window_length\\22: (\d+)', line).group(1))
            calls[(found.group(1), mask, window)] += 1
    return calls


def _rows(rows: int, length: int, lengths: list[int] | None = None) -> dict[str, np.ndarray]:
    ids = np.ones((rows, length), np.int32)
    batch = {"input_ids": ids, "labels": ids}
    if lengths is not None:
        batch["attention_mask"] = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return batch


def test_gpu_benchmark_step_gives_cudnn_the_causal_flash_kernel_and_no_mask(tmp_path, as_if_on_a_hopper_gpu):
    # benchmarks/gpu_1b.py's jtrain side exactly: TinyLlama-1.1B's shape, bf16, attention_impl cudnn,
    # 2048-token rows without an attention_mask (the batch size does not change the kernels).
    preset = gpu_1b.PRESETS["1b"]
    model = create_model("llama", preset.hf_config(), dtype="bfloat16", attention_impl="cudnn")
    hlo = _cuda_train_step(tmp_path, model, _rows(2, preset.seq))
    # One causal flash call per layer forward and one backward, with no bias or mask operand: the
    # kernel skips the masked half. A dense [B, 1, L, L] mask would show as fmhaScaleBiasSoftmax.
    assert _attention_calls(hlo) == {("__cudnn$fmhaSoftmax", "CAUSAL", 0): preset.layers,
                                     ("__cudnn$fmhaSoftmaxBackward", "CAUSAL", 0): preset.layers}
    # The dense layers keep lax.dot_general off the CPU: the CPU-only weight-gradient VJP
    # (jtrain.models.matmul, behind an optimization barrier) is not in the GPU step.
    assert "optimization_barrier" not in hlo


def test_mfu_counts_cudnn_attention_like_the_einsum_it_replaces(tmp_path, as_if_on_a_hopper_gpu):
    """The 1B benchmark step's model FLOPs: cuDNN's fused calls count as the einsum products they
    replace (full query x key grid), so MFU does not depend on the kernel; XLA's cost analysis of
    the compiled GPU step counted 1.15e13 of these 1.2e14 on the H200 (custom calls count zero)."""
    preset = gpu_1b.PRESETS["1b"]
    rows = _rows(preset.batch, preset.seq)
    variants = {"cudnn": {"attention_impl": "cudnn"}, "reference": {"attention_impl": "reference"},
                # gpu_probe.py's variant: remat recomputes cuDNN's forward too, which is not model work
                "cudnn_remat": {"attention_impl": "cudnn", "remat_policy": "full"}}
    counts = {name: traced_flops(_traced_train_step(tmp_path, create_model("llama", preset.hf_config(),
                                                                           dtype="bfloat16", **options),
                                                    rows, per_device_train_batch_size=preset.batch))
              for name, options in variants.items()}
    assert counts["cudnn"] == counts["reference"] == counts["cudnn_remat"]
    # the benchmark's formula, 6·N·T + attention, counts the RMSNorm weights in N too (no matmul)
    norm_weights = 2 * preset.hidden * preset.layers + preset.hidden
    tokens = preset.batch * preset.seq
    assert counts["cudnn"] == pytest.approx(preset.formula_flops() - 6 * norm_weights * tokens, rel=1e-12)


def test_right_padding_goes_to_cudnn_as_lengths_with_the_dense_mask_as_fallback(tmp_path, as_if_on_a_hopper_gpu):
    model = create_model("llama", _small_llama(), dtype="bfloat16", attention_impl="cudnn")
    hlo = _cuda_train_step(tmp_path, model, _rows(2, 256, lengths=[200, 256]))
    # Both branches of the per-batch cond are compiled (one runs): lengths for right padding, the
    # dense mask as a bias for any other padding. No call gets the causal-only kernel.
    assert _attention_calls(hlo) == {("__cudnn$fmhaSoftmax", "PADDING_CAUSAL", 0): 2,
                                     ("__cudnn$fmhaSoftmaxBackward", "PADDING_CAUSAL", 0): 2,
                                     ("__cudnn$fmhaScaleBiasSoftmax", "NO_MASK", 0): 2,
                                     ("__cudnn$fmhaScaleBiasSoftmaxBackward", "NO_MASK", 0): 2}


def test_sliding_window_reaches_cudnn_as_a_window_of_the_same_size(tmp_path, as_if_on_a_hopper_gpu):
    # Mistral's sliding_window w lets a query see itself and the w - 1 keys before it (HF's
    # definition, and jtrain's mask); cuDNN's sliding_window_length counts the same w keys.
    model = create_model("mistral", {**_small_llama(), "sliding_window": 64}, dtype="bfloat16",
                         attention_impl="cudnn")
    hlo = _cuda_train_step(tmp_path, model, _rows(2, 256))
    assert _attention_calls(hlo) == {("__cudnn$fmhaSoftmax", "CAUSAL", 64): 2,
                                     ("__cudnn$fmhaSoftmaxBackward", "CAUSAL", 64): 2}


# Every family with cuDNN attention, attention dropout off (HF's GPT-2 and BERT default to 0.1; see the
# next test). Right-padded rows: decoders get the causal padding kernel, BERT the bidirectional one.
FAMILIES = {
    "gpt2": ("causal_lm", dict(vocab_size=512, n_embd=256, n_layer=2, n_head=4, n_positions=256, attn_pdrop=0.0),
             "PADDING_CAUSAL"),
    "bert": ("sequence_classification", dict(vocab_size=512, hidden_size=256, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=512, num_labels=3,
                                             attention_probs_dropout_prob=0.0), "PADDING"),
    "mixtral": ("causal_lm", dict(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, max_position_embeddings=256), "PADDING_CAUSAL"),
}


def _family_batch(task: str) -> dict[str, np.ndarray]:
    batch = _rows(2, 256, lengths=[200, 256])
    if task == "sequence_classification":
        batch["labels"] = np.array([0, 2], np.int32)
    return batch


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gives_cudnn_its_padding_kernel(tmp_path, family, as_if_on_a_hopper_gpu):
    task, config, mask_type = FAMILIES[family]
    model = create_model(family, config, task=task, dtype="bfloat16", attention_impl="cudnn")
    hlo = _cuda_train_step(tmp_path, model, _family_batch(task))
    assert _attention_calls(hlo) == {("__cudnn$fmhaSoftmax", mask_type, 0): 2,
                                     ("__cudnn$fmhaSoftmaxBackward", mask_type, 0): 2,
                                     ("__cudnn$fmhaScaleBiasSoftmax", "NO_MASK", 0): 2,
                                     ("__cudnn$fmhaScaleBiasSoftmaxBackward", "NO_MASK", 0): 2}
    assert "optimization_barrier" not in hlo


def test_attention_dropout_keeps_cudnn_out_of_training_and_says_so(tmp_path, as_if_on_a_hopper_gpu, caplog):
    # HF's GPT-2 config trains with attn_pdrop 0.1; the fused call has no dropout, so training takes
    # the reference einsum (full scores). Asking for cuDNN then logs why it is not used, and how to fix it.
    from jtrain.models import attention

    attention._warned.clear()
    task, config, _ = FAMILIES["gpt2"]
    model = create_model("gpt2", {**config, "attn_pdrop": 0.1}, task=task, dtype="bfloat16", attention_impl="cudnn")
    with caplog.at_level("WARNING", logger="jtrain.models.attention"):
        hlo = _cuda_train_step(tmp_path, model, _family_batch(task))
    assert not _attention_calls(hlo)
    warnings = [r.getMessage() for r in caplog.records if "no attention-probability dropout" in r.getMessage()]
    assert len(warnings) == 1 and "attn_pdrop" in warnings[0] and "dropout 0.1 is active" in warnings[0]


@pytest.mark.parametrize("dtype,impl,cudnn,hinted", [("bfloat16", None, True, False),
                                                     ("float32", None, False, False),
                                                     ("bfloat16", "xla", False, True),
                                                     ("float32", "xla", False, False)])
def test_default_attention_takes_cudnn_on_a_gpu_in_half_precision(tmp_path, as_if_on_a_hopper_gpu, caplog, dtype,
                                                                  impl, cudnn, hinted):
    # The default attention_impl 'auto' takes cuDNN's flash kernel on a GPU in bf16/fp16 (JAX's own
    # implementation=None would take XLA's attention); float32 has no cuDNN kernel. An explicit 'xla'
    # stays on XLA's attention and, in half precision, says once that cuDNN is there.
    from jtrain.models import attention

    attention._warned.clear()
    model = create_model("llama", _small_llama(), dtype=dtype, **({"attention_impl": impl} if impl else {}))
    with caplog.at_level("WARNING", logger="jtrain.models.attention"):
        hlo = _cuda_train_step(tmp_path, model, _rows(2, 256), bf16=dtype == "bfloat16")
    expected = {("__cudnn$fmhaSoftmax", "CAUSAL", 0): 2, ("__cudnn$fmhaSoftmaxBackward", "CAUSAL", 0): 2}
    assert _attention_calls(hlo) == (expected if cudnn else {})
    hints = [r.getMessage() for r in caplog.records if "leave attention_impl at 'auto'" in r.getMessage()]
    assert len(hints) == (1 if hinted else 0)


@pytest.mark.parametrize("missing", ["cudnn", "head_size"])
def test_default_attention_falls_back_to_xla_where_cudnn_cannot_run(tmp_path, as_if_on_a_hopper_gpu, monkeypatch,
                                                                    caplog, missing):
    """'auto' asks JAX for cuDNN, and JAX refuses while tracing what cannot run (no cuDNN, as on an
    AMD GPU; a head size that is not a multiple of 8): the step then uses XLA's attention, says so
    once, and still trains (it lowers). An explicit 'cudnn' keeps JAX's error."""
    from jtrain.models import attention

    config = _small_llama()
    if missing == "cudnn":
        def no_cudnn():
            raise RuntimeError("cuDNN is not detected.")
        monkeypatch.setattr(cudnn_attention, "check_cudnn_version", no_cudnn)
    else:
        config.update(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)  # head size 12
    attention._warned.clear()
    with caplog.at_level("WARNING", logger="jtrain.models.attention"):
        hlo = _cuda_train_step(tmp_path, create_model("llama", config, dtype="bfloat16"), _rows(2, 256))
    assert not _attention_calls(hlo)
    fallbacks = [r.getMessage() for r in caplog.records if "cuDNN's fused attention is not available" in r.getMessage()]
    assert len(fallbacks) == 1
    with pytest.raises((RuntimeError, NotImplementedError)):
        _cuda_train_step(tmp_path, create_model("llama", config, dtype="bfloat16", attention_impl="cudnn"),
                         _rows(2, 256))


def _small_llama() -> dict:
    return dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)


@pytest.mark.parametrize("setup", ["qlora_scan_remat", "lora_fp16"])
def test_fine_tuning_wrappers_keep_the_default_cudnn_attention(tmp_path, as_if_on_a_hopper_gpu, setup):
    """The wrappers a fine-tune stacks on a model (an NF4 base dequantised in the step, LoRA adapters,
    scanned and rematerialised layers, fp16 with loss scaling) leave attention to the model: the
    default `auto` still reaches cuDNN in every layer, forward and backward, and the step lowers for
    CUDA (no CPU-only construct in it)."""
    from jtrain.peft import LoraConfig, apply_lora
    from jtrain.quant import QuantFormat, QuantizedModel

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if setup == "qlora_scan_remat":
        base = create_model("llama", _small_llama(), dtype="bfloat16", scan_layers=True, remat_policy="full")
        model = apply_lora(QuantizedModel(base, QuantFormat("nf4", 64, double_quant=True), targets=targets),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        overrides = {}
    else:
        model = apply_lora(create_model("llama", _small_llama(), dtype="float16"),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        overrides = {"bf16": False, "fp16": True}
    hlo = _cuda_train_step(tmp_path, model, _rows(2, 256), **overrides)
    calls = _attention_calls(hlo)
    layers = _small_llama()["num_hidden_layers"]
    if setup == "qlora_scan_remat":  # one scanned body: one call site each, run once per layer
        assert calls == {("__cudnn$fmhaSoftmax", "CAUSAL", 0): 2, ("__cudnn$fmhaSoftmaxBackward", "CAUSAL", 0): 1}
    else:
        assert calls == {("__cudnn$fmhaSoftmax", "CAUSAL", 0): layers,
                         ("__cudnn$fmhaSoftmaxBackward", "CAUSAL", 0): layers}


@pytest.mark.parametrize("policy,forwards", [("full", 2), ("dots_saveable", 1),
                                              ("dots_with_no_batch_dims_saveable", 2)])
def test_dots_saveable_keeps_cudnn_attention(tmp_path, as_if_on_a_hopper_gpu, policy, forwards):
    """JAX's dot policies do not see cuDNN's attention (a custom VJP around its own primitive), so
    `dots_saveable` recomputed each layer's attention forward in the backward, as `full` does (on the
    H200 probe that policy cost 231 against 217 ms per step, this recompute included). jtrain's
    `dots_saveable` keeps the forward's outputs; `dots_with_no_batch_dims_saveable` recomputes
    attention, which has batch dimensions, as it recomputes XLA's attention products."""
    model = create_model("llama", _small_llama(), dtype="bfloat16", remat_policy=policy)
    layers = _small_llama()["num_hidden_layers"]
    assert _attention_calls(_cuda_train_step(tmp_path, model, _rows(2, 256))) == {
        ("__cudnn$fmhaSoftmax", "CAUSAL", 0): forwards * layers,
        ("__cudnn$fmhaSoftmaxBackward", "CAUSAL", 0): layers}


def test_sequence_parallelism_keeps_cudnn_out_and_refuses_it_when_asked(tmp_path, as_if_on_a_hopper_gpu):
    """JAX's cuDNN partitioner refuses query rows split along the sequence (it would fail inside XLA's
    compile, where this lowering cannot reach): with the mesh's `sequence` axis the default `auto`
    takes XLA's attention, and an explicit `cudnn` is refused while tracing, naming the options.
    On a mesh of several devices the cuDNN call lowers inside JAX's custom partitioning, as a
    `CustomSPMDPartitioning` call that XLA's partitioner expands (and where the refusal would come)."""
    model = create_model("llama", _small_llama(), dtype="bfloat16")
    data = _cuda_train_step(tmp_path, model, _rows(2, 256), mesh_shape={"data": 2}, per_device_train_batch_size=1)
    assert "custom_call @CustomSPMDPartitioning" in data  # cuDNN under data parallelism
    mesh = {"mesh_shape": {"data": 1, "sequence": 2}, "per_device_train_batch_size": 2}
    hlo = _cuda_train_step(tmp_path, model, _rows(2, 256), **mesh)
    assert not _attention_calls(hlo) and "CustomSPMDPartitioning" not in hlo
    with pytest.raises(ConfigError, match=r"attention_impl 'cudnn' cannot run on this mesh: the sequence is split "
                                          r"over devices.*sequence_parallel_attention 'ring' is the other option\. "
                                          r"Use attention_impl 'auto' \(which takes XLA's attention here\) or 'xla'"):
        _cuda_train_step(tmp_path, create_model("llama", _small_llama(), dtype="bfloat16", attention_impl="cudnn"),
                         _rows(2, 256), **mesh)


def test_pipeline_stages_keep_cudnn_attention_under_their_vmap(tmp_path, as_if_on_a_hopper_gpu):
    """The pipeline runs every stage under `jax.vmap(..., spmd_axis_name="stage")`; cuDNN's attention
    has a batching rule, so the default `auto` keeps the fused kernel there: on a `stage: 2` mesh the
    step lowers for CUDA with it inside JAX's custom partitioning (see the sequence-parallel test),
    not with XLA's score einsums."""
    config = dict(_small_llama(), num_hidden_layers=4)
    model = create_model("llama", config, dtype="bfloat16", scan_layers=True)
    hlo = _cuda_train_step(tmp_path, model, _rows(4, 256), mesh_shape={"stage": 2, "data": 1},
                           per_device_train_batch_size=4)
    assert "custom_call @CustomSPMDPartitioning" in hlo
    xla = _cuda_train_step(tmp_path, create_model("llama", config, dtype="bfloat16", scan_layers=True,
                                                  attention_impl="xla"),
                           _rows(4, 256), mesh_shape={"stage": 2, "data": 1}, per_device_train_batch_size=4)
    assert "CustomSPMDPartitioning" not in xla  # the control: XLA's attention has no custom partitioning
