"""What an I-BAU run works on: a model with its weights, the defender's clean set, and the
sets that measure clean accuracy and attack success, split as the original code splits.

    from ibau_jax import experiment
    from ibau_jax.defenses import ibau

    exp = experiment.load("badnets_8_02_ckpt.pth", data_dir="shared/datasets/cifar10")
    exp.clean_x.shape                      # (5000, 32, 32, 3): CIFAR-10 test images 0..4999
    xb, yb = exp.batches(100)              # (50, 100, 32, 32, 3), (50, 100)
    exp.evaluate(exp.variables)            # {'clean_acc': 0.8494, 'asr_all': 0.9764, ...}

The split (``data.ibau_split``): clean set = test images ``0 .. n_clean-1``, accuracy set =
the rest, attack-success set = triggered copies of the clean set relabelled to the target
(target-class images included, as in the original code; ``asr_nontarget`` leaves them out).
``ibau-jax unlearn``, ``evaluate`` and ``sweep`` load through :func:`load`, and so do
benchmarks/round_time.py, benchmarks/model_pieces.py (and profile_round.py) and
experiments/solver_study.py, so their figures are measured on the same sets.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

# Imports of jax-using modules stay inside functions: the CLI imports this module, and
# `ibau-jax -h` should not pay for importing jax.

DATASETS = ("cifar10", "gtsrb")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Model, weights and the three sets of the original split (images float32 NHWC in [0, 1])."""

    model: Any               # flax module: model.apply(variables, x) -> logits
    variables: Any           # {'params', 'batch_stats'}, numpy leaves
    num_classes: int
    target: int
    clean_x: np.ndarray      # (n_clean, H, W, C): the defender's clean set
    clean_y: np.ndarray      # (n_clean,)
    acc_x: np.ndarray        # (n_test - n_clean, H, W, C): clean-accuracy images
    acc_y: np.ndarray
    asr_x: np.ndarray        # (n_clean, H, W, C): triggered copies of the clean set
    asr_t: np.ndarray        # (n_clean,): their attack labels (the target for all-to-one attacks)
    # true labels of the triggered images: clean_y, or clean_y once per trigger of a multi-trigger
    # attack (whose ASR set is k·n_clean images); None means clean_y
    asr_y: np.ndarray | None = None

    def limit_eval(self, n: int) -> "Experiment":
        """This experiment measured on the first ``n`` accuracy images and the first ``n``
        triggered images only (quick checks); ``n = 0``: all. The clean set is unchanged."""
        if not n:
            return self
        asr_y = self.clean_y if self.asr_y is None else self.asr_y
        return dataclasses.replace(self, acc_x=self.acc_x[:n], acc_y=self.acc_y[:n], asr_x=self.asr_x[:n],
                                   asr_t=self.asr_t[:n], asr_y=asr_y[:n])

    def batches(self, batch_size: int, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The clean set as ``(B, batch_size, H, W, C)`` and ``(B, batch_size)`` batches in the
        original order (a remainder is dropped); only the first ``limit`` when ``limit > 0``."""
        from . import data

        xb, yb = data.batches(self.clean_x, batch_size), data.batches(self.clean_y, batch_size)
        return (xb[:limit], yb[:limit]) if limit else (xb, yb)

    def evaluate(self, variables: Any, mesh: Any = None, per_class: bool = False) -> dict[str, Any]:
        """``{'clean_acc', 'asr_all', 'asr_nontarget', 'robust_acc'}`` of ``variables``, sharded
        over ``mesh`` (``sharding.mesh_for``; any device count) when given; ``per_class`` adds
        ``'class_acc'`` (accuracy within each class of the accuracy set, ``metrics.class_accuracy``)."""
        from . import metrics

        asr_y = self.clean_y if self.asr_y is None else self.asr_y
        return metrics.evaluate(self.model.apply, variables, self.acc_x, self.acc_y, self.asr_x, self.asr_t,
                                asr_y, mesh=mesh, num_classes=self.num_classes if per_class else 0)


def load_test_set(dataset: str, data_dir: str | os.PathLike | None, download: bool = True,
                  source: str = "auto"):
    """The test split of ``dataset`` (``data.Dataset``, uint8 images): CIFAR-10 from npz files,
    the official tarball or a download (``data.load_cifar10``); GTSRB from a local folder."""
    from . import data

    if dataset == "cifar10":
        return data.load_cifar10(data_dir, split="test", source=source, download=download)
    if dataset == "gtsrb":
        if data_dir is None:
            raise data.DataError("GTSRB needs a data directory (a folder holding test_roi32.npz or the "
                                 "official archive's Final_Test/): pass --data-dir / data_dir")
        return data.load_gtsrb(data_dir)
    raise data.DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def load(checkpoint: str | os.PathLike, *, dataset: str = "cifar10",
         data_dir: str | os.PathLike | None = None, model: str = "small_vgg", attack: str = "badnets",
         target: int = 8, trigger_dir: str | os.PathLike | None = None, n_clean: int = 5000,
         download: bool = True, data_source: str = "auto", attack_seed: int = 0,
         attack_options: dict[str, Any] | None = None) -> Experiment:
    """Load the weights at ``checkpoint`` (PyTorch ``.pth`` or ibau-jax ``.npz``) into ``model``,
    the test split of ``dataset``, and ``attack``'s trigger; split as the original code.

    ``attack``: a registered attack (``attacks.ATTACK_NAMES``): the original triggers (badnets,
    trojan_sq, ..., applied exactly by the original rule, files from ``trigger_dir``) or the
    rest of the suite (``attack_seed`` must be the seed it was trained with, since blend and
    wanet triggers are seeded) and ``attack_options`` its builder's options as trained (e.g.
    SIG's ``delta``). The ASR set is ``attacks.asr_test_set`` of the clean set.
    ``download=False`` never downloads.
    Bad input raises ``data.DataError``, ``checkpoints.CheckpointError`` or
    ``attacks.AttackError`` with a message that names the problem and the fix.
    """
    from . import attacks, checkpoints, data, models

    test = load_test_set(dataset, data_dir, download=download, source=data_source)
    clean, acc_set = data.ibau_split(test, n_clean)
    target = attacks.check_target(target, test.num_classes)
    variables, _ = checkpoints.load_model(checkpoint, model, test.num_classes)
    clean_x = data.to_float(clean.x)
    the_attack = attacks.get(attack, num_classes=test.num_classes, target=target,
                             trigger_dir=trigger_dir, seed=attack_seed, **(attack_options or {}))
    asr_x, asr_t, _ = attacks.asr_test_set(clean_x, clean.y, the_attack)
    return Experiment(models.get_model(model, test.num_classes), variables, test.num_classes, target,
                      clean_x, np.asarray(clean.y), data.to_float(acc_set.x), np.asarray(acc_set.y), asr_x, asr_t,
                      attacks.asr_true_labels(clean.y, the_attack))
