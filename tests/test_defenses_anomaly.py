"""The MAD anomaly index of Neural Cleanse (``defenses.anomaly``) against hand computation."""
from __future__ import annotations

import numpy as np
import pytest

from ibau_jax.defenses import anomaly
from ibau_jax.errors import ConfigError


def test_anomaly_index_of_a_hand_made_vector():
    # sorted [1, 9, 10, 11, 12, 13, 30]: median 11; |v - 11| = [10, 1, 0, 1, 2, 2, 19] -> median 2
    v = [1.0, 10.0, 11.0, 12.0, 13.0, 9.0, 30.0]
    mad = 1.4826 * 2
    np.testing.assert_allclose(anomaly.anomaly_index(v), np.array([10, 1, 0, 1, 2, 2, 19]) / mad, rtol=1e-12)
    # class 0 (index 3.37, below the median) is flagged; class 6 (index 6.41) is LARGE, so not
    assert anomaly.flag_small(v) == [0]
    assert anomaly.flag_small(v, threshold=5.0) == []
    # index 0.674 of class 5 (9 < 11) passes 0.5; class 4 (13) is above the median
    assert anomaly.flag_small(v, threshold=0.5) == [0, 5]


def test_threshold_is_strict_and_ties_give_no_flags():
    # median 3, |v - 3| = [3, 0, 0, 1, 1] -> MAD 1.4826; class 0's index is 3 / 1.4826 = 2.0235
    v = [0.0, 3.0, 3.0, 4.0, 2.0]
    np.testing.assert_allclose(anomaly.anomaly_index(v)[0], 3 / 1.4826, rtol=1e-12)
    assert anomaly.flag_small(v) == [0]
    assert anomaly.flag_small(v, threshold=3 / 1.4826) == []  # "> threshold", not ">="
    np.testing.assert_array_equal(anomaly.anomaly_index([3.0, 3.0, 3.0]), [0.0, 0.0, 0.0])
    assert anomaly.flag_small([3.0, 3.0, 3.0]) == []


def test_bad_inputs():
    with pytest.raises(ConfigError, match="diverged"):
        anomaly.anomaly_index([1.0, float("nan"), 2.0])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        anomaly.anomaly_index([1.0])
