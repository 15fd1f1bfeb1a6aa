"""Training a (poisoned) classifier: the compiled step and epoch, the loop, and the run directory.

    from ibau_jax import training
    state, history = training.train(model, x, y, training.TrainConfig(epochs=30), run_dir="runs/badnets")
    variables, meta = training.latest_model("runs/badnets")

* ``step``: ``TrainConfig``, ``TrainState``, ``create_state``, ``augment``, ``train_step``
  (optional per-example weights for padded batches), ``train_epoch`` (one ``lax.scan``; the
  loop itself, for any step, is ``scan_epoch``) and
  their data-parallel forms ``make_sharded_train_step`` / ``make_sharded_train_epoch``.
* ``rundir``: one atomic orbax checkpoint step per finished epoch; ``read_run``,
  ``latest_model``; ``RunError``.
* ``loop``: ``train`` and ``EvalSets``.
"""
from .loop import EvalSets, train
from .rundir import (CHECKPOINTS, DATA_KEY, MAX_TO_KEEP, MODEL_NPZ, RUN_JSON, RunError, data_fingerprint,
                     latest_model, read_run)
from .step import (OPTIMIZERS, TrainConfig, TrainState, augment, create_state, make_epoch_fn,
                   make_optimizer, make_sharded_train_epoch, make_sharded_train_step, scan_epoch, train_epoch,
                   train_step)

__all__ = [
    "CHECKPOINTS", "DATA_KEY", "MAX_TO_KEEP", "MODEL_NPZ", "OPTIMIZERS", "RUN_JSON",
    "EvalSets", "RunError", "TrainConfig", "TrainState",
    "augment", "create_state", "data_fingerprint", "latest_model", "make_epoch_fn", "make_optimizer",
    "make_sharded_train_epoch", "make_sharded_train_step", "read_run", "scan_epoch", "train", "train_epoch",
    "train_step",
]
