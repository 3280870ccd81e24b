"""Resume onto a different mesh: saved under FSDP over 8 devices, restored for data parallelism
over 4. Every restored array must carry the new run's sharding (orbax reads each device's slice
into the target sharding) and training must continue as the original run did.
"""

from __future__ import annotations

import jax
import numpy as np

from jtrain import Trainer, TrainerCallback, TrainingArguments
from jtrain.checkpoint import restore_state
from jtrain.data.loader import ArrayDataset
from tiny import lm_rows, tiny_llama

# Loss tolerance between the FSDP-8 run and its data-parallel-4 continuation. The two meshes
# reduce in a different order (8-way reduce-scatter/all-gather vs 4-way all-reduce), which moves
# float32 results by ~1e-7 relative per op; three Adam updates at lr 1e-2 carry that into the
# params at ~1e-9 and into the loss at ~1e-6 relative at most; the logged losses are also rounded
# to 6 decimals (~3e-7 relative at a loss of 3). 1e-5 leaves a 10x margin, while a restore that
# lost anything (fresh Adam moments, step 0 in the schedule, other data) moves the loss by more
# than 1e-3.
LOSS_RTOL = 1e-5


def _args(out, mesh_shape, per_device, **kw) -> TrainingArguments:
    # Both runs use a global batch of 16 rows, so the saved loader position means the same batch.
    return TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=per_device,
                             learning_rate=1e-2, logging_steps=1, disable_tqdm=True, mesh_shape=mesh_shape,
                             save_steps=3, **kw)


class ParamsAtSave(TrainerCallback):
    def __init__(self):
        self.trainer, self.params = None, {}

    def on_save(self, args, state, control, **kwargs):
        self.params[state.global_step] = jax.device_get(self.trainer.train_state.params)


def _losses(trainer, after: int) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > after}


def test_fsdp8_checkpoint_resumes_on_data4(tmp_path):
    data = ArrayDataset(lm_rows(64, 16))
    snap = ParamsAtSave()
    fsdp = Trainer(tiny_llama(), _args(tmp_path / "a", {"fsdp": 8}, 2), train_dataset=data, callbacks=[snap])
    snap.trainer = fsdp
    fsdp.train()
    sharded = [p.sharding for p in jax.tree.leaves(fsdp.params) if not p.sharding.is_fully_replicated]
    assert sharded and all(len(s.device_set) == 8 for s in sharded)  # the checkpoint really came from FSDP-8
    ckpt = str(tmp_path / "a" / "checkpoint-3")

    dp = Trainer(tiny_llama(), _args(tmp_path / "a", {"data": 4}, 4, save_strategy="no"), train_dataset=data)
    dp._setup(6)
    target = dp.train_state
    restored = restore_state(ckpt, target)
    want = jax.tree.leaves(dp.steps.state_sharding)
    got = jax.tree.leaves(restored)
    assert len(got) == len(want) == len(jax.tree.leaves(target))
    for leaf, sharding in zip(got, want):
        assert leaf.sharding == sharding, (leaf.sharding, sharding)
        assert len(leaf.sharding.device_set) == 4
    # The values are a copy of what FSDP-8 saved: bitwise.
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(snap.params[3]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert int(restored.step) == 3

    dp.train(resume_from_checkpoint=ckpt)
    assert dp.state.global_step == 6
    want_losses, got_losses = _losses(fsdp, 3), _losses(dp, 3)
    assert sorted(got_losses) == [4, 5, 6]
    np.testing.assert_allclose([got_losses[s] for s in (4, 5, 6)], [want_losses[s] for s in (4, 5, 6)],
                               rtol=LOSS_RTOL)
