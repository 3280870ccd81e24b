"""On a GPU: does each way jtrain calls cuDNN's fused attention compute the reference attention?

    python benchmarks/gpu_attention_check.py [--out FILE]   # on a GPU: cuDNN, bf16, TinyLlama's head shape
    python benchmarks/gpu_attention_check.py --cpu          # CPU: XLA's fused call, float32 (for tests)

`jtrain.models.attention.attend` sends cuDNN a causal batch as `is_causal` (no mask), a sliding window
as `local_window_size`, right padding as key-value sequence lengths and left padding as a dense mask
(a `lax.cond` on the batch), and a bidirectional padded batch as lengths too. tests/test_gpu_lowering.py
checks on CPU which cuDNN call each becomes; only a GPU can run them. For every case this compares the
output and the q/k/v gradients of `sum(out * w)` with `attend(implementation="reference")` (a plain
einsum on the dense mask) in float32 on the same bf16-rounded inputs, and reads the compiled program
to confirm that cuDNN ran.

Tolerance on the GPU: max |got - ref| <= 2e-2 x max |ref|. cuDNN keeps scores and sums in float32
but rounds the probabilities (for the value product) and the outputs to bf16 (8 bits: 3.9e-3 relative
per rounding); 2e-2 is 5 such roundings. A wrong mask column or a missed row moves entries by the
size of the output itself. On the CPU (float32 on both sides, only the summation order differs) the
tolerance is 1e-5 x max |ref|.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

CASES = ("causal", "window", "right_padding", "left_padding", "bidirectional_padding")
GPU_SHAPE = dict(batch=2, length=2048, heads=32, kv_heads=4, head_dim=64)  # benchmarks/gpu_1b.py's layers
CPU_SHAPE = dict(batch=2, length=64, heads=4, kv_heads=2, head_dim=8)


def _mask(case: str, batch: int, length: int):
    import jax.numpy as jnp
    import numpy as np

    from jtrain.models.masks import make_attention_mask

    lengths = np.array([length] + [length * 5 // 8] * (batch - 1))[:, None]
    right = (np.arange(length)[None, :] < lengths).astype(np.int32)
    if case == "causal":
        return make_attention_mask(None, None, causal=True)
    if case == "window":
        return make_attention_mask(None, None, causal=True, sliding_window=length // 4 + 1)
    if case == "right_padding":
        return make_attention_mask(jnp.asarray(right), None, causal=True)
    if case == "left_padding":
        return make_attention_mask(jnp.asarray(right[:, ::-1].copy()), None, causal=True)
    return make_attention_mask(jnp.asarray(right), None, causal=False)


def check(case: str, on_gpu: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from jtrain.models.attention import attend

    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    b, l, n, kh, h = (shape[k] for k in ("batch", "length", "heads", "kv_heads", "head_dim"))
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, l, n, h), dtype)
    k, v = (jax.random.normal(key, (b, l, kh, h), dtype) for key in keys[1:3])
    w = jax.random.normal(keys[3], (b, l, n, h), jnp.float32)
    mask = _mask(case, b, l)
    impl = "cudnn" if on_gpu else "xla"
    causal = case != "bidirectional_padding"

    def value_and_grads(fn):
        def run(q, k, v):
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp((w / w.size).astype(out.dtype)))
        return jax.jit(run)

    fused = value_and_grads(lambda q, k, v: attend(q, k, v, mask, implementation=impl, causal_blocks=causal,
                                                   sequence_parallel=not on_gpu, branch_on_padding=True))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    reference = value_and_grads(lambda q, k, v: attend(q, k, v, mask, implementation="reference"))
    hlo = fused.lower(q, k, v).compile().as_text()
    got, want = fused(q, k, v), reference(*f32)
    errors = {}
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        scale = float(jnp.abs(r).max())
        errors[name] = float(jnp.abs(g.astype(jnp.float32) - r).max()) / scale
    tolerance = 2e-2 if on_gpu else 1e-5
    return {"case": case, "implementation": impl, "dtype": str(jnp.dtype(dtype)), "shape": shape,
            "cudnn_in_program": "__cudnn$fmha" in hlo, "relative_errors": errors, "tolerance": tolerance,
            "ok": all(e <= tolerance for e in errors.values()) and ("__cudnn$fmha" in hlo) == on_gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU with XLA's fused call (for tests)")
    ap.add_argument("--out", default=None, help="write the results as markdown here")
    a = ap.parse_args()
    if a.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not a.cpu:
        raise SystemExit(f"no GPU here (JAX backend {jax.default_backend()!r}); pass --cpu for the CPU mode")
    results = [check(case, on_gpu) for case in CASES]
    lines = [f"attention on {jax.devices()[0].device_kind}: jtrain's fused calls against the reference einsum",
             "", "| case | kernel | dtype | cuDNN in program | max rel. error out / dq / dk / dv | tolerance | ok |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        e = r["relative_errors"]
        lines.append(f"| {r['case']} | {r['implementation']} | {r['dtype']} | {r['cudnn_in_program']} | "
                     f"{e['out']:.1e} / {e['dq']:.1e} / {e['dk']:.1e} / {e['dv']:.1e} | {r['tolerance']:g} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print("RESULT " + json.dumps(results))
    if not all(r["ok"] for r in results):
        raise SystemExit("some fused attention path differs from the reference (table above)")


if __name__ == "__main__":
    main()
