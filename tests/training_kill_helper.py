"""Subprocess helper for tests/test_training_rundir.py: train the tiny run, SIGKILL itself at the
k-th write of the run directory (``training.rundir.on_write``), or run to the end when k = 0.

    python tests/training_kill_helper.py RUN_DIR K [--resume]
"""
from __future__ import annotations

import os
import signal
import sys

import numpy as np

EPOCHS, WRITES_PER_EPOCH = 3, 4  # "model" (inside the step), "commit", "export model.npz", "export run.json"
META = {"model": "small_vgg_tiny", "num_classes": 10}


def problem():
    from ibau_jax import models, training

    model = models.SmallVGG(10, widths=(4, 8, 8))
    rng = np.random.default_rng(0)
    x = rng.random((64, 16, 16, 3), dtype=np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    return model, x, y, training.TrainConfig(epochs=EPOCHS, batch_size=16, crop_pad=2, seed=1)


def main(argv: list[str]) -> int:
    from ibau_jax import training
    from ibau_jax.training import rundir

    run_dir, k = argv[0], int(argv[1])
    writes = []

    def hook(label: str) -> None:
        writes.append(label)
        if len(writes) == k:
            os.kill(os.getpid(), signal.SIGKILL)

    rundir.on_write = hook
    model, x, y, config = problem()
    training.train(model, x, y, config, run_dir=run_dir, meta=META, resume="--resume" in argv, quiet=True,
                   log=lambda s: None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
