"""Data parallelism over a device mesh, generic over any step function (no defense imported).

One jitted SPMD program per step (``jax.jit`` + ``NamedSharding`` on a 1-D mesh axis
``data``): weights, optimizer states and other small state are replicated; batches are split
along their *example* axis. Every mean over examples inside the step is a mean over the whole
batch, so XLA inserts the all-reduces and N devices compute the one-device step (up to float
summation order).

Any device count: when the example count n does not divide evenly, ``pad_examples`` pads the
example axis to a multiple of the device count and returns per-example weights (1 real,
0 padding) that the step uses in every mean (``weighted_mean``), so the padding never counts.

Multi-host: after ``distributed.init_distributed``, ``make_mesh()`` spans every process's
devices; every process passes the same *global* host arrays and gets replicated results back.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import ConfigError

PyTree = Any
AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``num_devices`` global devices (default all).

    In a multi-process job the mesh must hold every process's devices (leave num_devices None).
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"asked for {n} devices but {len(devices)} are available "
                          f"(on CPU, more come from XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(f"a multi-process mesh must use all {len(devices)} devices, got {n}")
    # Auto axes: the partitioner propagates shardings (no explicit-sharding types needed).
    return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def mesh_for(devices: int | None) -> Mesh | None:
    """The mesh a run uses for ``--devices`` (default: every device of every process); None for one device."""
    n = jax.device_count() if devices is None else devices
    return make_mesh(devices) if n > 1 or jax.process_count() > 1 else None


def num_devices(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape[AXIS])


def padded_size(n: int, mesh: Mesh | None) -> int:
    """The smallest multiple of the mesh size that holds n examples."""
    d = num_devices(mesh)
    return -(-n // d) * d


def pad_examples(x: Any, axis: int, size: int) -> np.ndarray:
    """x zero-padded along ``axis`` to ``size`` entries (host numpy)."""
    x = np.asarray(x)
    extra = size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad axis {axis} of length {x.shape[axis]} down to {size}")
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return np.pad(x, pad)


def example_weights(n: int, size: int, lead: tuple[int, ...] = ()) -> np.ndarray:
    """(*lead, size) float32: 1 for the n real examples, 0 for the padding."""
    w = (np.arange(size) < n).astype(np.float32)
    return np.broadcast_to(w, (*lead, size)).copy()


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean of ``values`` (n,) over the examples whose weight is 1; plain ``jnp.mean`` when
    ``weights`` is None (no padding: bitwise the unpadded computation)."""
    if weights is None:
        return jnp.mean(values)
    return jnp.sum(values * weights) / jnp.sum(weights)


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a host value every process holds in full."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    x = np.asarray(x)
    # make_array_from_callback also works when the mesh spans several processes (device_put
    # of a host array onto non-addressable devices does not).
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def split_along(mesh: Mesh, axis: int, ndim: int | None = None) -> NamedSharding:
    """The sharding that splits dimension ``axis`` over the mesh."""
    return NamedSharding(mesh, P(*([None] * axis), AXIS))


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """Every leaf replicated on every device of ``mesh``."""
    s = replicated(mesh)
    return jax.tree.map(lambda a: put(a, s), tree)


def shard(mesh: Mesh, tree: PyTree, axis: int) -> PyTree:
    """Every leaf split along ``axis`` (its length must be a multiple of the mesh size)."""
    s = split_along(mesh, axis)
    return jax.tree.map(lambda a: put(a, s), tree)


def to_host(tree: PyTree) -> PyTree:
    """Replicated (or single-device) arrays -> numpy, on every process (reads the local copy)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)


def gather(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """A sharded array gathered to every process as numpy (a replicated copy, then the local one)."""
    return to_host(jax.jit(lambda a: a, out_shardings=replicated(mesh))(x))


def check_divisible(n: int, mesh: Mesh) -> None:
    """ConfigError unless n examples split evenly over the mesh (for programs that do not pad)."""
    d = num_devices(mesh)
    if n % d:
        lo, hi = n - n % d, n + d - n % d
        raise ConfigError(f"batch size {n} is not divisible by the {d} devices of the mesh; "
                          f"use a batch size that is a multiple of {d} (e.g. {lo or hi} or {hi}) "
                          f"or a device count that divides {n}")
