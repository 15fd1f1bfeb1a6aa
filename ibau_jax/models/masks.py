"""Per-channel neuron masks on BatchNorm outputs, and padded-example masks for BN statistics.

Neuron masks live in their own variable collection ``"neuron_masks"``, nested like the BN
layers in ``"batch_stats"`` but with one (C,) vector per BN instead of ``{"mean", "var"}``::

    small_vgg:  {"neuron_masks": {"bn0": (32,), ..., "bn5": (128,)}}
    resnet18:   {"neuron_masks": {"bn1": (64,), "layer1_0": {"bn1": (64,), "bn2": (64,)}, ...,
                                  "layer2_0": {..., "shortcut_bn": (128,)}, ...}}

A BN's output y (N, H, W, C) becomes y · m (m broadcast over N, H, W). A BN with no entry is
unmasked, and ``init`` creates no such collection, so the params/batch_stats layout (and the
checkpoints) do not change. Pruning channel c of a BN = a 0 at index c of its vector
(Fine-Pruning); a soft mask in [0, 1] is what ANP optimizes. Pass the masks with the other
collections: ``model.apply({**variables, "neuron_masks": masks}, x)``.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from .errors import ModelError

NEURON_MASKS = "neuron_masks"


def _is_bn_stats(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"mean", "var"}


def _bn_channels(batch_stats: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    """{"layer1_0/bn1": C, ...}: every BN in a batch_stats tree and its channel count."""
    out: dict[str, int] = {}
    for name, node in batch_stats.items():
        if _is_bn_stats(node):
            out[prefix + name] = int(node["mean"].shape[-1])
        elif isinstance(node, Mapping):
            out.update(_bn_channels(node, f"{prefix}{name}/"))
    return out


def mask_template(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, Any]:
    """All-ones neuron masks for every BN of ``model``: the tree ``"neuron_masks"`` expects.

    ``variables`` are ``model``'s (``init_variables(model)`` or a loaded checkpoint); the BN
    layers and their widths are read from ``variables["batch_stats"]``. Returns a nested dict
    with the BN names as keys and a float32 (C,) vector of ones per BN. Applying it leaves the
    model's output unchanged (bitwise); set entries to 0 to prune channels.
    """
    if "batch_stats" not in variables:
        raise ModelError(f"variables of {type(model).__name__} have no 'batch_stats'; pass the "
                         "full variables (models.init_variables(model) or a loaded checkpoint)")

    def ones(tree: Mapping[str, Any]) -> dict[str, Any]:
        return {name: jnp.ones(node["mean"].shape, jnp.float32) if _is_bn_stats(node) else ones(node)
                for name, node in tree.items() if isinstance(node, Mapping)}

    return ones(variables["batch_stats"])


def check_neuron_masks(module: nn.Module) -> None:
    """ModelError unless every entry of ``module``'s ``"neuron_masks"`` names a BN in its
    ``"batch_stats"`` (same nesting) and is a (C,) vector for that BN's C channels.

    Call at the top of a model's ``__call__``: a misspelled name would otherwise be ignored
    silently (a BN without a mask is unmasked). Checks static shapes only (no device work).
    """
    variables = module.variables
    if not variables.get(NEURON_MASKS):
        return
    channels = _bn_channels(variables.get("batch_stats", {}))
    leaves = jax.tree_util.tree_flatten_with_path(variables[NEURON_MASKS])[0]
    for path, leaf in leaves:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name not in channels:
            raise ModelError(f"neuron mask {name!r} names no BatchNorm of {type(module).__name__}; "
                             f"use the names of models.mask_template: {sorted(channels)}")
        if jnp.shape(leaf) != (channels[name],):
            raise ModelError(f"neuron mask {name!r} has shape {jnp.shape(leaf)}, its BatchNorm has "
                             f"{channels[name]} channels; pass a ({channels[name]},) vector")


def check_example_mask(x: jax.Array, example_mask: jax.Array | None) -> jax.Array | None:
    """``example_mask`` as an array, or ModelError unless it is (N,) for x of shape (N, ...)."""
    if example_mask is None:
        return None
    example_mask = jnp.asarray(example_mask)
    if example_mask.shape != x.shape[:1]:
        raise ModelError(f"example_mask has shape {example_mask.shape}, the batch has {x.shape[0]} "
                         f"examples; pass a ({x.shape[0]},) vector of 0/1 (1 = a real example)")
    return example_mask
