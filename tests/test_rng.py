"""Named random streams: independent, reproducible, stable when streams are added."""
import numpy as np
import pytest

from ibau_jax import rng
from ibau_jax.errors import ConfigError


def test_streams_are_reproducible_and_independent():
    a, b = rng.streams(3), rng.streams(3)
    assert a.seed_of("poison") == b.seed_of("poison")
    np.testing.assert_array_equal(a.numpy("poison").random(5), b.numpy("poison").random(5))
    seeds = {name: a.seed_of(name) for name in rng.STREAMS}
    assert len(set(seeds.values())) == len(rng.STREAMS)  # distinct streams
    assert rng.streams(4).seed_of("poison") != seeds["poison"]
    # a stream is SeedSequence(seed, spawn_key=(index,)), i.e. the index-th child spawn() gives
    child = np.random.SeedSequence(3).spawn(len(rng.STREAMS))[rng.STREAMS.index("trigger")]
    np.testing.assert_array_equal(child.generate_state(4), a.sequence("trigger").generate_state(4))
    np.testing.assert_array_equal(np.asarray(a.key("init")), np.asarray(b.key("init")))


def test_bad_seed_and_stream():
    with pytest.raises(ConfigError, match="non-negative integer"):
        rng.streams(-1)
    with pytest.raises(KeyError, match="unknown random stream"):
        rng.streams(0).seed_of("nope")
