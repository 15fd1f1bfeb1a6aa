"""Named intermediate features, sown by the models into the ``"intermediates"`` collection.

SmallVGG sows "block1", "block2", "block3" (each conv block's output after pooling, before
dropout: (N, 16, 16, 32), (N, 8, 8, 64), (N, 4, 4, 128) for 32x32 inputs) and "features"
(the classifier's input, flattened in NCHW order: (N, 2048)). The ResNets sow "layer1" ..
"layer4" (each stage's output: (N, 32, 32, 64) .. (N, 4, 4, 512)) and "features" (the
global average pool: (N, 512)). ``sow`` does nothing unless "intermediates" is mutable, so
a plain ``apply`` computes (bitwise) what it computed before.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax

from .errors import ModelError

INTERMEDIATES = "intermediates"


def sown(intermediates: Mapping[str, Any],
         names: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """``{name: array}`` from an "intermediates" collection.

    ``sow`` stores a tuple per name (one entry per call of the model); the last one is kept.

    For a training-mode apply: ``logits, state = model.apply(variables, x, train=True,
    mutable=["batch_stats", "intermediates"])`` then ``sown(state["intermediates"])``.
    ``names`` selects (and orders) the features; ModelError for a name the model does not sow.
    """
    available = list(intermediates)
    names = available if names is None else list(names)
    unknown = [n for n in names if n not in intermediates]
    if unknown:
        raise ModelError(f"unknown feature name(s) {unknown}; this model sows {available}")
    return {n: intermediates[n][-1] for n in names}


def features(model: nn.Module, variables: Mapping[str, Any], x: jax.Array,
             names: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """The named intermediate features of ``model`` on x, in eval mode (running BN stats).

    variables: ``{"params", "batch_stats"}`` (plus ``"neuron_masks"`` to see a masked model);
    x (N, H, W, 3). Returns ``{name: array}`` for ``names`` (all sown names when None, in the
    order the forward pass sows them; under ``jit`` dict keys come back sorted). Pure and
    jit-able (``names`` must be static).
    """
    _, state = model.apply(variables, x, mutable=[INTERMEDIATES])
    return sown(state.get(INTERMEDIATES, {}), names)
