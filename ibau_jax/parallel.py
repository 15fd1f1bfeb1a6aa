"""Scale-out: data parallelism over a device mesh, multi-host start-up, and vmapped sweeps.

Data parallelism (one jitted SPMD program, ``jax.jit`` + ``NamedSharding`` on a 1-D mesh
axis ``data``): params, BatchNorm statistics, the optimizer state and δ are replicated; the
clean batches are split along their *example* axis, xb (B, n, H, W, C) -> shard axis 1,
yb / masks (B, n) -> axis 1. Every loss of a round is a mean over the whole batch inside one
compiled program, so XLA inserts the all-reduces and N devices compute the single-device
round (up to float summation order). Rule: n (the batch size) must be divisible by the
number of devices (``check_divisible``).

Multi-host: ``init_distributed`` (flags or ``IBAU_COORDINATOR`` / ``IBAU_NUM_PROCESSES`` /
``IBAU_PROCESS_ID``) then ``make_mesh()`` spans every process's devices; every process
passes the same *global* host arrays and gets replicated results back.

Sweeps: ``sweep_rounds`` vmaps one round over seeds (masks) and numeric hyperparameters
(``SWEEPABLE``), ``chunk`` runs per compiled call; distinct K (or other static fields)
are separate compilations in a Python loop.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import metrics
from .defenses import ibau

PyTree = Any
AXIS = "data"
# IBAUConfig fields that may be traced (vmapped) in a sweep: they only enter arithmetic.
SWEEPABLE = ("outer_lr", "fp_step", "inner_reg", "radius", "search_lr", "search_reg")
METRICS = ("clean_acc", "asr_all", "asr_nontarget")


# ----------------------------------------------------------------------------- multi-host

def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Join a multi-process JAX job; arguments default to ``IBAU_COORDINATOR`` ("host:port"),
    ``IBAU_NUM_PROCESSES`` and ``IBAU_PROCESS_ID``. Call before any other JAX work.

    Returns False (and does nothing) when no coordinator is given: a single-process run.
    On CPU the cross-process collectives go through gloo (set here explicitly).
    """
    coordinator_address = coordinator_address or os.environ.get("IBAU_COORDINATOR") or None
    if num_processes is None and os.environ.get("IBAU_NUM_PROCESSES"):
        num_processes = int(os.environ["IBAU_NUM_PROCESSES"])
    if process_id is None and os.environ.get("IBAU_PROCESS_ID"):
        process_id = int(os.environ["IBAU_PROCESS_ID"])
    if coordinator_address is None:
        if num_processes not in (None, 1):
            raise ValueError(f"num_processes={num_processes} needs a coordinator address "
                             f"(--coordinator host:port or IBAU_COORDINATOR)")
        return False
    if num_processes is None or process_id is None:
        raise ValueError("a multi-process run needs the coordinator, the number of processes and this "
                         "process's id (--coordinator/--num-processes/--process-id or IBAU_COORDINATOR/"
                         "IBAU_NUM_PROCESSES/IBAU_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU cross-process backend
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def add_distributed_args(p) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` and ``--devices`` on an argparse parser."""
    p.add_argument("--devices", type=int, default=None,
                   help="devices on the data-parallel mesh (default: all, over all processes)")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0 (or IBAU_COORDINATOR)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: processes (or IBAU_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process (or IBAU_PROCESS_ID)")


def cli_mesh(devices: int | None) -> Mesh | None:
    """The CLI's mesh: ``devices`` (default: every device of every process); None when that is 1."""
    n = jax.device_count() if devices is None else devices
    return make_mesh(devices) if n > 1 or jax.process_count() > 1 else None


# ----------------------------------------------------------------------------- mesh and placement

def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``num_devices`` global devices (default all).

    In a multi-process job the mesh must hold every process's devices (leave num_devices None).
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices but {len(devices)} are available "
                         f"(on CPU, more come from XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"a multi-process mesh must use all {len(devices)} devices, got {n}")
    # Auto axes: the partitioner propagates shardings (no explicit-sharding types needed).
    return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def check_divisible(batch_size: int, mesh: Mesh) -> None:
    """ValueError unless the per-batch example count splits evenly over the mesh."""
    d = mesh.shape[AXIS]
    if batch_size % d:
        lo, hi = batch_size - batch_size % d, batch_size + d - batch_size % d
        raise ValueError(f"batch size {batch_size} is not divisible by the {d} devices of the mesh; "
                         f"use a batch size that is a multiple of {d} (e.g. {lo or hi} or {hi}) "
                         f"or a device count that divides {batch_size}")


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a host value every process holds in full."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    x = np.asarray(x)
    # make_array_from_callback also works when the mesh spans several processes (device_put
    # of a host array onto non-addressable devices does not).
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """Every leaf replicated on every device of ``mesh``."""
    s = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: _put(a, s), tree)


def shard_batches(mesh: Mesh, xb: Any, yb: Any, masks: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """xb (B, n, H, W, C), yb (B, n), masks (B, n) split along the example axis n (axis 1)."""
    check_divisible(int(np.shape(xb)[1]), mesh)
    s = NamedSharding(mesh, P(None, AXIS))
    return _put(xb, s), _put(yb, s), _put(masks, s)


def to_host(tree: PyTree) -> PyTree:
    """Replicated (or single-device) arrays -> numpy, on every process (reads the local copy)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)


# ----------------------------------------------------------------------------- sharded round

def make_sharded_round(model, config: ibau.IBAUConfig, mesh: Mesh,
                       on_step: Callable[[jax.Array], None] | None = None) -> Callable[..., ibau.RoundOutput]:
    """``round(params, batch_stats, opt_state, xb, yb, masks) -> RoundOutput``, as ``ibau.make_round``,
    run as one SPMD program over ``mesh``.

    Inputs may be host arrays (every process passes the same global values) or already placed
    with ``replicate`` / ``shard_batches``. Outputs are replicated (``to_host`` reads them).
    xb (B, n, H, W, C) with n divisible by the mesh size, yb (B, n), masks (B, n).
    ``on_step(loss)`` is called after each outer step, as in ``ibau.unlearn_round``.
    """
    logits = ibau.make_logits_fn(model)
    check_divisible(config.batch_size, mesh)
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(None, AXIS))

    @partial(jax.jit, in_shardings=(repl, repl, repl, data, data, data), out_shardings=repl)
    def round_fn(params, batch_stats, opt_state, xb, yb, masks):
        fn = lambda p, x: logits(batch_stats, p, x)
        return ibau.unlearn_round(fn, config, params, opt_state, xb, yb, masks, on_step)

    def run(params, batch_stats, opt_state, xb, yb, masks) -> ibau.RoundOutput:
        params, batch_stats, opt_state = replicate(mesh, (params, batch_stats, opt_state))
        return round_fn(params, batch_stats, opt_state, *shard_batches(mesh, xb, yb, masks))

    run.jitted = round_fn  # for .lower(...) / cost analysis
    return run


def make_sharded_train_step(mesh: Mesh, crop_pad: int = 4, flip: bool = True) -> Callable[..., Any]:
    """``step(state, (x, y), rng) -> (state, metrics)``: ``train.train_step`` as one SPMD program.

    The state (params, BatchNorm statistics, optimizer state) is replicated and the batch
    x (n, H, W, C), y (n,) split over ``mesh``; the loss mean and the BatchNorm batch
    statistics are over the global batch (XLA inserts the all-reduces), so N devices
    reproduce the one-device step. n must be divisible by the mesh size.
    """
    from . import train

    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    step = jax.jit(partial(train.train_step, crop_pad=crop_pad, flip=flip),
                   in_shardings=(repl, (data, data), repl), out_shardings=(repl, repl))

    def run(state, batch, rng):
        x, y = batch
        check_divisible(int(np.shape(x)[0]), mesh)
        return step(replicate(mesh, state), (_put(x, data), _put(y, data)), replicate(mesh, rng))

    return run


# ----------------------------------------------------------------------------- sharded evaluation

def predict(apply_fn: metrics.ApplyFn, variables: PyTree, x: Any, mesh: Mesh, batch_size: int = 500) -> np.ndarray:
    """``metrics.predict`` with each eval batch split over ``mesh``: argmax predictions (N,) of x (N, H, W, C).

    The tail is padded to a whole batch and dropped; batch_size must be divisible by the mesh size.
    """
    check_divisible(batch_size, mesh)
    xb, n = metrics.pad_to_batches(x, batch_size)
    xb = _put(xb, NamedSharding(mesh, P(None, AXIS)))
    preds = metrics.predict_batches(apply_fn, replicate(mesh, variables), xb)
    # Gather to every process (a replicated copy), then read the local one.
    preds = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(preds)
    return to_host(preds).reshape(-1)[:n]


def evaluate(apply_fn: metrics.ApplyFn, variables: PyTree, acc_x: Any, acc_y: Any, asr_x: Any,
             asr_targets: Any, asr_true: Any, mesh: Mesh, batch_size: int = 500) -> dict[str, float]:
    """``metrics.evaluate`` with the eval batches sharded over ``mesh``."""
    out = {"clean_acc": metrics.accuracy(predict(apply_fn, variables, acc_x, mesh, batch_size), acc_y)}
    out.update(metrics.attack_success(predict(apply_fn, variables, asr_x, mesh, batch_size), asr_targets, asr_true))
    return out


# ----------------------------------------------------------------------------- sweeps

def make_hparam_round(model, config: ibau.IBAUConfig, names: Sequence[str], mesh: Mesh | None = None,
                      strategy: str = "auto"):
    """Jitted ``round(params, batch_stats, opt_state, xb, yb, masks, hp) -> RoundOutput`` over R runs.

    R runs in one compiled program: params / opt_state with a leading run axis R, masks
    (R, B, n), hp {name: (R,)} for ``names`` ⊆ SWEEPABLE; batch_stats, xb, yb shared. With
    ``mesh`` the example axis of xb / yb / masks is also split over the devices.

    ``strategy``: ``"vmap"`` batches the runs (``jax.vmap``), ``"map"`` runs them one after
    another inside the program (``lax.map``), ``"auto"`` = vmap on accelerators, map on CPU.
    Why: vmapping over per-run weights turns every convolution into a grouped one, which
    XLA's CPU backend runs slowly (4 seeds vmapped took 2.2x the time of 4 separate runs,
    docs/scaling.md); on a GPU the batched convolutions are what fills the device.
    """
    if strategy == "auto":
        strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    if strategy not in ("vmap", "map"):
        raise ValueError(f"strategy must be 'auto', 'vmap' or 'map', got {strategy!r}")
    bad = [n for n in names if n not in SWEEPABLE]
    if bad:
        raise ValueError(f"cannot sweep {bad} in one compilation; sweepable: {SWEEPABLE} (loop over K etc.)")
    logits = ibau.make_logits_fn(model)

    def one(params, batch_stats, opt_state, xb, yb, masks, hp):
        # Traced hyperparameters in the frozen config: its checks never look at these fields.
        cfg = dataclasses.replace(config, **hp)
        return ibau.unlearn_round(lambda p, x: logits(batch_stats, p, x), cfg, params, opt_state, xb, yb, masks)

    if strategy == "vmap":
        batched = jax.vmap(one, in_axes=(0, None, 0, None, None, 0, 0))
    else:
        def batched(params, batch_stats, opt_state, xb, yb, masks, hp):
            run = lambda a: one(a[0], batch_stats, a[1], xb, yb, a[2], a[3])
            return jax.lax.map(run, (params, opt_state, masks, hp))
    if mesh is None:
        return jax.jit(batched)
    check_divisible(config.batch_size, mesh)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, AXIS))
    return jax.jit(batched, in_shardings=(repl, repl, repl, data, data, NamedSharding(mesh, P(None, None, AXIS)), repl),
                   out_shardings=repl)


def grid_settings(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of ``{field: values}`` as a list of ``{field: value}`` (K first varies slowest)."""
    names = sorted(grid, key=lambda k: (k != "K", k))
    return [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))]


def _mean_std(vals: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(vals, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def sweep_rounds(model, config: ibau.IBAUConfig, variables: PyTree, xb: Any, yb: Any, *,
                 seeds: Sequence[int], grid: Mapping[str, Sequence[Any]] | None = None, rounds: int = 1,
                 chunk: int = 8, evaluate_fn: Callable[[PyTree], dict[str, float]] | None = None,
                 mesh: Mesh | None = None, keep_params: bool = False,
                 on_chunk: Callable[[int, int], None] | None = None, strategy: str = "auto",
                 mask_rng: str = "python") -> list[dict[str, Any]]:
    """I-BAU from ``variables`` for every (setting, seed): ``rounds`` rounds each.

    Each seed's perturbed images are ``ibau.seed_masks(seed, rounds, B, config, mask_rng)``,
    as ``ibau-jax unlearn --seed`` draws them.

    grid: ``{field: values}``; fields in SWEEPABLE are vmapped (traced), any other
    IBAUConfig field (e.g. K, solver) loops in Python, one compilation per distinct value.
    Runs go ``chunk`` at a time through one compiled call (the last chunk is padded by
    repeating a run, so there is one compilation per static setting). xb (B, n, H, W, C), yb (B, n).

    Returns one record per setting: the setting, per-seed metrics from ``evaluate_fn(variables)``
    (if given), their mean and std (ddof 1) as ``{metric}_mean`` / ``{metric}_std``, and with
    ``keep_params`` the final params per seed (host numpy, seed order).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    grid = dict(grid or {})
    for name in grid:
        if name not in {f.name for f in dataclasses.fields(ibau.IBAUConfig)}:
            raise ValueError(f"unknown IBAUConfig field {name!r} in the sweep grid")
    traced = sorted(n for n in grid if n in SWEEPABLE)
    static = sorted((n for n in grid if n not in SWEEPABLE), key=lambda k: (k != "K", k))
    params0, batch_stats = variables["params"], variables["batch_stats"]
    B = int(np.shape(xb)[0])
    if mesh is not None:
        check_divisible(int(np.shape(xb)[1]), mesh)
        data = NamedSharding(mesh, P(None, AXIS))
        xb, yb = _put(xb, data), _put(yb, data)
    else:
        xb, yb = jnp.asarray(xb), jnp.asarray(yb)
    masks_of = {s: ibau.seed_masks(s, rounds, B, config, mask_rng) for s in seeds}
    records: list[dict[str, Any]] = []
    for st in grid_settings({n: grid[n] for n in static}) or [{}]:
        cfg = dataclasses.replace(config, **st)
        settings = grid_settings({n: grid[n] for n in traced})
        runs = [(i, s) for i in range(len(settings)) for s in seeds]  # (setting index, seed)
        fn = make_hparam_round(model, cfg, traced, mesh, strategy)
        tx = cfg.outer_tx()  # the optimizer state's structure does not depend on the (traced) lr
        final: dict[tuple[int, int], PyTree] = {}
        for c0 in range(0, len(runs), chunk):
            part = runs[c0:c0 + chunk]
            part = part + [part[-1]] * (chunk - len(part))  # pad: one compiled shape per setting
            hp = {n: np.asarray([settings[i][n] for i, _ in part], np.float32) for n in traced}
            params = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (chunk, *np.shape(a))), params0)
            opt_state = jax.vmap(tx.init)(jax.tree.map(jnp.asarray, params))
            for r in range(rounds):
                masks = np.stack([masks_of[s][r] for _, s in part])
                if mesh is not None:
                    masks = _put(masks, NamedSharding(mesh, P(None, None, AXIS)))
                    params, opt_state, bs = replicate(mesh, (params, opt_state, batch_stats))
                    hp_in = replicate(mesh, hp)
                else:
                    bs, hp_in = batch_stats, hp
                out = fn(params, bs, opt_state, xb, yb, masks, hp_in)
                params, opt_state = out.params, out.opt_state
            host = to_host(params)
            for j, run in enumerate(runs[c0:c0 + chunk]):
                final[run] = jax.tree.map(lambda a: a[j], host)
            if on_chunk is not None:
                on_chunk(min(c0 + chunk, len(runs)), len(runs))
        for i, setting in enumerate(settings):
            rec: dict[str, Any] = {**st, **setting, "seeds": list(seeds)}
            if evaluate_fn is not None:
                per = [evaluate_fn({"params": final[(i, s)], "batch_stats": batch_stats}) for s in seeds]
                rec["per_seed"] = per
                for m in METRICS:
                    rec[f"{m}_mean"], rec[f"{m}_std"] = _mean_std([p[m] for p in per])
            if keep_params:
                rec["params"] = [final[(i, s)] for s in seeds]
            records.append(rec)
    return records


def sweep_markdown(result: dict[str, Any]) -> str:
    """A sweep result's records as a markdown table (mean ± std over seeds)."""
    keys = result["swept"]
    head = "| " + " | ".join(keys) + " | seeds | clean acc | ASR (all) | ASR (non-target) |"
    lines = [f"# I-BAU sweep: {result['config'].get('attack', '')} on {result['config'].get('dataset', '')}, "
             f"{result['config'].get('rounds', 1)} round(s)", "", head, "|" + "---|" * (len(keys) + 4)]
    for r in result["records"]:
        cells = [f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        cells.append(str(len(r["seeds"])))
        cells += [f"{r[m + '_mean']:.4f} ± {r[m + '_std']:.4f}" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
