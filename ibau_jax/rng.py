"""Independent random streams from one seed.

One ``--seed`` drives every random choice of a run, each through its own stream, so that
changing how many numbers one consumer draws (more epochs, another poison ratio) never shifts
another's numbers:

    s = rng.streams(seed)
    s.key("init")            # jax PRNG key for model initialisation
    s.key("epochs")          # jax key; epoch e uses fold_in(key, e)
    s.numpy("poison")        # numpy Generator choosing the poisoned images
    s.numpy("trigger")       # numpy Generator for random trigger patterns (Blend noise, WaNet grid)
    s.seed_of("masks")       # an int seed for I-BAU's perturbed-image masks (Python's random, as the original)

Each stream is ``numpy.random.SeedSequence(seed, spawn_key=(STREAMS.index(name),))``: the
SeedSequence children that ``spawn`` would give, addressed by name, so adding a stream at the
end never changes the others. Same seed, same numbers on one machine (see docs/architecture.md
for what else determinism needs: same thread count and XLA version).
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Order matters: a stream's index is its spawn key. Append new streams at the end.
STREAMS = ("init", "epochs", "poison", "trigger", "masks", "defense", "eval")

@dataclasses.dataclass(frozen=True)
class Streams:
    """Named, independent random streams of one integer seed."""

    seed: int

    def sequence(self, name: str) -> np.random.SeedSequence:
        if name not in STREAMS:
            raise KeyError(f"unknown random stream {name!r}; streams: {', '.join(STREAMS)}")
        return np.random.SeedSequence(self.seed, spawn_key=(STREAMS.index(name),))

    def seed_of(self, name: str) -> int:
        """A 32-bit integer seed for the stream (for APIs that take an int)."""
        return int(self.sequence(name).generate_state(1, np.uint32)[0])

    def numpy(self, name: str) -> np.random.Generator:
        return np.random.default_rng(self.sequence(name))

    def key(self, name: str):
        """A jax PRNG key for the stream."""
        import jax

        return jax.random.PRNGKey(self.seed_of(name))


def streams(seed: int) -> Streams:
    """The named streams of ``seed`` (a non-negative int)."""
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        from .errors import ConfigError

        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return Streams(int(seed))
