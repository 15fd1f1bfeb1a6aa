"""Neural Cleanse (``nc``; Wang et al., S&P 2019; reference code bolunwang/backdoor).

Detection: reverse-engineer, for every class t, the smallest mask-and-pattern trigger that
sends the clean set to t (``trigger_inversion``: all classes in one vmapped program), then flag
the classes whose mask L1 norm is an abnormally small outlier (``anomaly.flag_small``: MAD
anomaly index > 2, below the median). Mitigation ("unlearning", §VI-C): fine-tune on the clean
set where ``patch_fraction`` (20 %) of the images carry a flagged class's reversed trigger with
their TRUE label (``patching.patched_clean_set`` then the ``ft`` defense). With no class
flagged the model comes back unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from ..errors import ConfigError, check_finite
from . import anomaly, patching, trigger_inversion
from .base import CleanSet, DefenseResult, check_one_batch
from .ft import FineTuning
from .patching import PatchingConfig
from .trigger_inversion import Regularizer, SearchConfig


@dataclasses.dataclass(frozen=True)
class NCConfig(SearchConfig, PatchingConfig):
    """Neural Cleanse's settings: the trigger search's (:class:`trigger_inversion.SearchConfig`,
    whose docstring cites each default), the mitigation's (:class:`patching.PatchingConfig`)
    and the detection's: anomaly_threshold 2.0, NC's outlier cut on the MAD anomaly index
    (paper §IV, reference ``mad_outlier_detection.py``).
    """

    anomaly_threshold: float = 2.0

    def __post_init__(self):
        SearchConfig.__post_init__(self)
        PatchingConfig.__post_init__(self)
        if check_finite("anomaly_threshold", self.anomaly_threshold) <= 0:
            raise ConfigError(f"anomaly_threshold must be a finite number > 0, got {self.anomaly_threshold!r}")


class NeuralCleanse:
    """``nc``: detection by trigger reverse-engineering, mitigation by patching and fine-tuning.

    Result: ``flagged_classes``, ``class_scores`` (each class's mask L1 norm), artifacts
    ``masks`` (K, H, W, 1) and ``patterns`` (K, H, W, C); diagnostics: ``anomaly_index``,
    per-class ``final_cost``, ``attack_success`` (last epoch), ``search_epochs``, ``found``, the
    search's ``search_seconds`` / ``search_compile_seconds``, and ``mitigation``. History:
    one record per fine-tuning epoch (empty when nothing was flagged or ``mitigate`` is off).
    """

    name = "nc"
    Config = NCConfig

    def __init__(self, config: NCConfig | None = None, on_step: Callable[..., None] | None = None):
        self.config = config if config is not None else self.Config()
        self.on_step = on_step

    def regularizer(self) -> Regularizer | None:
        """The extra loss term of the search (none for NC; TABOR's regularisers in ``tabor``)."""
        return None

    def num_steps(self, clean_set: CleanSet) -> int:
        """Search epochs (per chunk of classes) plus the fine-tuning steps if a class is flagged."""
        cfg = self.config
        chunks = -(-clean_set.num_classes // cfg.class_chunk)
        ft = cfg.ft_epochs * (len(clean_set) // cfg.ft_batch_size) if cfg.mitigate else 0
        return cfg.epochs * chunks + ft

    def check(self, clean_set: CleanSet) -> None:
        """Errors the user can fix, raised before any work."""
        cfg = self.config
        if clean_set.num_classes < 3:
            raise ConfigError(f"{self.name} compares the trigger sizes of the classes and needs at least 3, "
                              f"got {clean_set.num_classes}")
        self.check_size(len(clean_set))

    def check_size(self, n: int) -> None:
        """ConfigError when a clean set of ``n`` images is empty or, with mitigation, holds less
        than one fine-tuning batch."""
        cfg = self.config
        if n < 1:
            raise ConfigError(f"{self.name} needs a non-empty clean set (--n-clean)")
        if cfg.mitigate:
            check_one_batch(n, cfg.ft_batch_size, kind="fine-tuning", field="ft_batch_size",
                            other="detect only (--set mitigate=false)")

    def run(self, model, variables, clean_set: CleanSet, key: jax.Array, *, mesh: Any = None,
            callback=None) -> DefenseResult:
        cfg = self.config
        self.check(clean_set)
        search_key, patch_key, ft_key = jax.random.split(key, 3)
        classes = list(range(clean_set.num_classes))
        on_epoch = (lambda e: self.on_step(1)) if self.on_step is not None else None

        def finish_bar(epochs_run: int) -> None:  # early-stopped chunks: advance the bar to the full count
            if self.on_step is not None:
                for _ in range(cfg.epochs - epochs_run):
                    self.on_step(1)

        apply_fn = lambda v, z: model.apply(v, z, train=False)
        found, seconds, compile_seconds = trigger_inversion.reverse_engineer(
            apply_fn, {"params": variables["params"], "batch_stats": variables["batch_stats"]},
            clean_set.x, clean_set.y, classes, search_key, cfg, self.regularizer(), on_epoch, finish_bar)
        index = anomaly.anomaly_index(found.norms)
        flagged = anomaly.flag_small(found.norms, cfg.anomaly_threshold)
        diagnostics: dict[str, Any] = {
            "anomaly_index": [round(float(a), 4) for a in index],
            "final_cost": [float(c) for c in found.cost],
            "attack_success": [round(float(a), 4) for a in found.attack_success],
            "search_epochs": [int(e) for e in found.epochs],
            "found": [bool(f) for f in found.found],
            "search_seconds": round(seconds, 3), "search_compile_seconds": round(compile_seconds, 3)}
        result = DefenseResult(jax.device_get(variables), [], diagnostics, seconds, compile_seconds,
                               flagged_classes=flagged, class_scores=[float(n) for n in found.norms],
                               artifacts={"masks": found.masks, "patterns": found.patterns})
        if not flagged:
            diagnostics["mitigation"] = "no class flagged: the model is returned unchanged"
            return result
        if not cfg.mitigate:
            diagnostics["mitigation"] = "mitigate=False: the model is returned unchanged"
            return result

        stamp = lambda x, c: trigger_inversion.stamp(x, found.masks[c], found.patterns[c])
        seed = int(jax.random.randint(patch_key, (), 0, 2 ** 31 - 1))
        patched, which = patching.patched_clean_set(clean_set, stamp, flagged, cfg.patch_fraction,
                                                    np.random.default_rng(seed))
        ft = FineTuning(cfg.ft_config(), on_step=self.on_step).run(model, variables, patched, ft_key, mesh=mesh,
                                                                    callback=callback)
        diagnostics.update(ft.diagnostics, patched_images=int((which >= 0).sum()),
                           mitigation=f"fine-tuned {cfg.ft_epochs} epochs on the clean set with "
                                      f"{cfg.patch_fraction:.0%} carrying the reversed trigger(s) of {flagged}")
        result.variables, result.history = ft.variables, ft.history
        result.seconds += ft.seconds
        result.compile_seconds += ft.compile_seconds
        return result
