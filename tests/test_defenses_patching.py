"""The mitigation set of Neural Cleanse (``defenses.patching``) against hand computation."""
from __future__ import annotations

import numpy as np
import pytest

from ibau_jax.defenses import CleanSet, patching
from ibau_jax.errors import ConfigError


def _set(n=50):
    rng = np.random.default_rng(0)
    return CleanSet(rng.random((n, 4, 4, 1), dtype=np.float32), rng.integers(0, 6, n), 6)


def _stamp(x, c):  # class c's "trigger": pixel (c % 4, 0) set to 1
    x = x.copy()
    x[:, c % 4, 0, :] = 1.0
    return x


def test_fraction_split_and_true_labels():
    clean = _set(50)
    new, which = patching.patched_clean_set(clean, _stamp, [3, 5], 0.2, np.random.default_rng(1))
    # round(0.2 * 50) = 10 images, split evenly 5 / 5 over the classes, in the rng's order
    chosen = np.random.default_rng(1).permutation(50)[:10]
    np.testing.assert_array_equal(np.flatnonzero(which >= 0), np.sort(chosen))
    np.testing.assert_array_equal(which[chosen[:5]], 3)
    np.testing.assert_array_equal(which[chosen[5:]], 5)
    np.testing.assert_array_equal(new.y, clean.y)  # labels stay TRUE
    for i in range(50):
        want = _stamp(clean.x[i:i + 1], which[i])[0] if which[i] >= 0 else clean.x[i]
        np.testing.assert_array_equal(new.x[i], want)
    assert new.num_classes == 6


def test_nothing_to_patch_and_bad_fraction():
    clean = _set(10)
    for classes, frac in (([], 0.2), ([1], 0.0)):
        new, which = patching.patched_clean_set(clean, _stamp, classes, frac, np.random.default_rng(0))
        assert new is clean and (which == -1).all()
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        patching.patched_clean_set(clean, _stamp, [1], 1.5, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="non-finite"):
        patching.patched_clean_set(clean, lambda x, c: x * np.nan, [1], 0.5, np.random.default_rng(0))
