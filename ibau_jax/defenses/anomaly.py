"""Outlier detection over per-class trigger sizes: the MAD anomaly index of Neural Cleanse.

Neural Cleanse (Wang et al., S&P 2019, bolunwang/backdoor ``mad_outlier_detection``) reverses a
trigger per class and calls a class infected when its trigger is abnormally SMALL: with the
median m of the per-class sizes v_c and the median absolute deviation scaled to a normal
distribution's standard deviation, MAD = 1.4826 · median_c |v_c − m|, the anomaly index is

    a_c = |v_c − m| / MAD,

and class c is flagged when a_c > 2 and v_c < m. TABOR and DeepInspect use the same test on
their own trigger sizes.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

CONSISTENCY = 1.4826  # MAD -> standard deviation of a normal distribution (NC's constant)


def anomaly_index(values: np.ndarray) -> np.ndarray:
    """a_c = |v_c − median(v)| / (1.4826 · median|v − median(v)|) for (K,) values, K ≥ 2.

    Values all equal (MAD 0) give index 0 everywhere (no outlier); non-finite values are a
    ConfigError (a diverged trigger search must not be scored).
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ConfigError(f"the anomaly index needs one value per class for at least 2 classes, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ConfigError(f"non-finite trigger sizes {v.tolist()}: the trigger search diverged; lower its learning rate")
    dev = np.abs(v - np.median(v))
    mad = CONSISTENCY * np.median(dev)
    return np.zeros_like(v) if mad == 0 else dev / mad


def flag_small(values: np.ndarray, threshold: float = 2.0) -> list[int]:
    """The classes whose value is below the median with anomaly index > ``threshold`` (NC: 2)."""
    v = np.asarray(values, np.float64)
    idx = anomaly_index(v)
    return [int(c) for c in np.flatnonzero((idx > threshold) & (v < np.median(v)))]
