"""The third side of `vs_hf.py --sides jtrain,hf,jax`: the same Llama as a plain JAX program.

What a JAX user would write without jtrain: the model in `jax.numpy` over a dict of arrays
(RMSNorm, rotary embeddings, grouped-query attention through `jax.nn.dot_product_attention`,
SwiGLU, an untied head), optax's softmax cross-entropy on the shifted logits, and
`optax.chain(clip_by_global_norm, adamw)` with HF's linear schedule and no decay on the norms,
in one `jax.jit` step with the state donated. The loop reads each update's loss one update late
(as the Trainer does), so dispatch overlaps the device. `bf16` computes in bfloat16 over float32
master weights and keeps the loss in float32, as the two Trainers do.

It is the baseline the issue's float32 target was written against ("a plain jitted JAX step with
a straightforward model"), measured in the same run as the two Trainers: jtrain / plain JAX says
what jtrain's own step work buys on this machine, jtrain / HF what is left.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import vs_hf


def init_params(p: vs_hf.Preset, seed: int) -> dict[str, Any]:
    """Float32 weights, normal(0, 0.02) as HF's `initializer_range`, norms at one."""
    import jax
    import jax.numpy as jnp

    d, f, v, hd = p.hidden, p.intermediate, p.vocab, p.hidden // p.heads
    kv = (p.kv_heads or p.heads) * hd
    keys = iter(jax.random.split(jax.random.key(seed), 2 + 7 * p.layers))

    def normal(*shape: int) -> jax.Array:
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    layers = [{"attn_norm": jnp.ones(d), "wq": normal(d, d), "wk": normal(d, kv), "wv": normal(d, kv),
               "wo": normal(d, d), "mlp_norm": jnp.ones(d), "w_gate": normal(d, f), "w_up": normal(d, f),
               "w_down": normal(f, d)} for _ in range(p.layers)]
    return {"embed": normal(v, d), "layers": layers, "final_norm": jnp.ones(d), "lm_head": normal(d, v)}


def _rms_norm(x: Any, weight: Any, eps: float = 1e-6) -> Any:
    import jax.numpy as jnp

    x32 = x.astype(jnp.float32)
    return (x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps))).astype(x.dtype) * weight


def _rotary(x: Any, theta: float = 10000.0) -> Any:
    """HF's rotate-half rotary embedding over [B, L, heads, head_dim]."""
    import jax.numpy as jnp

    length, dim = x.shape[1], x.shape[-1]
    freqs = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[None, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[None, :, None, :].astype(x.dtype)
    half = dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def forward(params: dict[str, Any], ids: Any, p: vs_hf.Preset) -> Any:
    """Logits [B, L, vocab] in the params' dtype."""
    import jax

    b, length = ids.shape
    hd, kv_heads = p.hidden // p.heads, p.kv_heads or p.heads
    x = params["embed"][ids]
    for layer in params["layers"]:
        h = _rms_norm(x, layer["attn_norm"])
        q = _rotary((h @ layer["wq"]).reshape(b, length, p.heads, hd))
        k = _rotary((h @ layer["wk"]).reshape(b, length, kv_heads, hd))
        v = (h @ layer["wv"]).reshape(b, length, kv_heads, hd)
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + attn.reshape(b, length, p.hidden) @ layer["wo"]
        h = _rms_norm(x, layer["mlp_norm"])
        x = x + (jax.nn.silu(h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"]
    return _rms_norm(x, params["final_norm"]) @ params["lm_head"]


def make_step(p: vs_hf.Preset, total_steps: int, bf16: bool) -> tuple[Any, Any]:
    """(optimizer, jitted step(params, opt_state, ids) -> (params, opt_state, loss)), state donated."""
    import jax
    import jax.numpy as jnp
    import optax

    schedule = optax.linear_schedule(vs_hf.LEARNING_RATE, 0.0, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda w: w.ndim > 1, params)  # HF: no decay on norms
    optimizer = optax.chain(optax.clip_by_global_norm(vs_hf.MAX_GRAD_NORM),
                            optax.adamw(schedule, weight_decay=vs_hf.WEIGHT_DECAY, mask=decay_mask))

    def loss_fn(params: dict[str, Any], ids: Any) -> Any:
        if bf16:
            params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
        logits = forward(params, ids, p).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def step(params: dict[str, Any], opt_state: Any, ids: Any) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, jax.jit(step, donate_argnums=(0, 1))


def worker(a: argparse.Namespace, p: vs_hf.Preset) -> dict[str, Any]:
    """One plain-JAX run on the CPU, timed and reported like the two Trainer sides."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from jtrain.flops import measure_matmul_peak, step_flops
    from jtrain.models import cpu_gemm

    # This side's products are XLA's dots, so its peak is XLA's too, not the oneDNN (or MKL) GEMM that
    # jtrain's dense layers (and so jtrain.flops' peak) take on the CPU. Read once, when the first
    # product is traced (the peak below).
    os.environ[cpu_gemm.ENV_MODE] = "xla"
    os.environ[cpu_gemm.ENV_F32_MODE] = "xla"

    total = a.steps + a.warmup
    ids = vs_hf.token_rows(p, total * p.batch)["input_ids"].reshape(total, p.batch, p.seq)
    optimizer, step = make_step(p, total, a.bf16)
    params = init_params(p, vs_hf.SEED)
    n_params = sum(int(np.prod(w.shape)) for w in jax.tree.leaves(params))
    opt_state = optimizer.init(params)
    flops = None if a.quick else step_flops(step, params, opt_state, ids[0])
    times, losses, pending = vs_hf._Times(), [], None
    dtype = "bfloat16" if a.bf16 else "float32"
    peak_before = 0.0 if a.quick else measure_matmul_peak(dtype)  # the best of before and after, as vs_hf's sides
    times.begin()
    for i in range(total):
        params, opt_state, loss = step(params, opt_state, ids[i])
        if pending is not None:
            losses.append(float(pending))  # the previous update's loss: a host read one update late
        pending = loss
        times.step_end()
    losses.append(float(pending))
    times.train_end = times.marks[-1][0]
    peak = None if a.quick else max(peak_before, measure_matmul_peak(dtype))
    out = vs_hf._common_result(p, times, a.warmup, peak, float(np.mean(losses)))
    out.update(side="jax", params=n_params, step_flops=flops, device=str(jax.devices()[0]),
               finite=all(math.isfinite(x) for x in losses))
    return out
