"""Training a (poisoned) classifier: a pure jitted step, an epoch as one ``lax.scan``.

    state = create_state(model, config, steps_per_epoch)
    state, metrics = train_step(state, (x, y), rng)          # x (n, H, W, C) float in [0, 1]
    state, metrics = train_epoch(state, xs, ys, rng, ...)    # every batch of an epoch, compiled

``train`` is the loop around it: evaluation (clean accuracy, ASR) every ``eval_every``
epochs, a tqdm bar with images/s and ETA, and, with a run directory, an atomic checkpoint
after every epoch (``model.npz`` + ``train_state.npz`` + ``run.json``) that ``resume=True``
continues from exactly (same result as an uninterrupted run).

Augmentation runs inside the step in JAX: random crop with ``crop_pad`` zero padding and a
random horizontal flip (off for GTSRB, whose signs are not mirror-symmetric).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

PyTree = Any

RUN_JSON = "run.json"
MODEL_NPZ = "model.npz"
STATE_NPZ = "train_state.npz"


class RunError(ValueError):
    """A missing, corrupt or mismatching run directory. The message names the fix."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and augmentation settings. Defaults: SGD momentum 0.9, cosine schedule."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"            # 'sgd' (momentum 0.9, Nesterov off) or 'adam'
    lr: float = 0.05                  # peak learning rate; cosine-decayed to 0 over all steps
    momentum: float = 0.9
    weight_decay: float = 5e-4        # decoupled L2 via optax.add_decayed_weights; 0 = off
    crop_pad: int = 4                 # random crop after zero padding by this many pixels; 0 = off
    flip: bool = True                 # random horizontal flip (False for GTSRB)
    seed: int = 0
    eval_every: int = 1               # epochs between evaluations (the last epoch is always evaluated)

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")


class TrainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm running statistics."""

    batch_stats: PyTree = None


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD+momentum or Adam with a cosine schedule over ``epochs * steps_per_epoch`` steps."""
    schedule = optax.cosine_decay_schedule(config.lr, config.epochs * steps_per_epoch)
    opt = (optax.sgd(schedule, momentum=config.momentum) if config.optimizer == "sgd"
           else optax.adam(schedule))
    if config.weight_decay:
        # Decay only kernels: BatchNorm scales and biases are not regularised (common practice).
        mask = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
        opt = optax.chain(optax.add_decayed_weights(config.weight_decay, mask), opt)
    return opt


def create_state(model: nn.Module, config: TrainConfig, steps_per_epoch: int,
                 image_shape: tuple[int, int, int] = (32, 32, 3)) -> TrainState:
    """Fresh parameters (seeded by ``config.seed``) and optimizer state."""
    variables = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, *image_shape), jnp.float32),
                           train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             tx=make_optimizer(config, steps_per_epoch))


def augment(x: jax.Array, key: jax.Array, crop_pad: int = 4, flip: bool = True) -> jax.Array:
    """Random crop (zero padding ``crop_pad``) and random horizontal flip, per image.

    x (N, H, W, C) -> (N, H, W, C). Crop offsets are uniform in [0, 2*crop_pad] per axis.
    """
    n, h, w, _ = x.shape
    kc, kf = jax.random.split(key)
    if crop_pad:
        padded = jnp.pad(x, ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad), (0, 0)))
        offs = jax.random.randint(kc, (n, 2), 0, 2 * crop_pad + 1)
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
        x = jax.vmap(crop)(padded, offs)
    if flip:
        do = jax.random.bernoulli(kf, 0.5, (n,))
        x = jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)
    return x


@partial(jax.jit, static_argnames=("crop_pad", "flip"))
def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array], rng: jax.Array,
               crop_pad: int = 4, flip: bool = True) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step in train mode (batch statistics, dropout); batch = (x (n,H,W,C) in [0,1], y (n,)).

    Returns the new state (params, opt state and BatchNorm running stats updated) and
    ``{'loss', 'acc'}`` of the batch (before the update).
    """
    x, y = batch
    aug_key, drop_key = jax.random.split(rng)
    x = augment(x.astype(jnp.float32), aug_key, crop_pad, flip)

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                         rngs={"dropout": drop_key}, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "acc": jnp.mean(jnp.argmax(logits, -1) == y)}


@partial(jax.jit, static_argnames=("batch_size", "crop_pad", "flip", "on_step"))
def train_epoch(state: TrainState, xs: jax.Array, ys: jax.Array, rng: jax.Array, batch_size: int,
                crop_pad: int = 4, flip: bool = True,
                on_step: Callable[[jax.Array], None] | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One epoch: shuffle xs (N, H, W, C), ys (N,), then ``lax.scan`` ``train_step`` over the batches.

    The last N mod batch_size shuffled images are skipped (BatchNorm wants full batches).
    ``on_step(loss)`` is called from the compiled loop after each step (progress bars).
    Returns the state and the epoch's mean ``{'loss', 'acc'}``.
    """
    nb = xs.shape[0] // batch_size
    perm_key, step_key = jax.random.split(rng)
    idx = jax.random.permutation(perm_key, xs.shape[0])[: nb * batch_size].reshape(nb, batch_size)

    def body(state, inp):
        i, k = inp
        state, m = train_step(state, (xs[i], ys[i]), k, crop_pad=crop_pad, flip=flip)
        if on_step is not None:
            jax.debug.callback(on_step, m["loss"])
        return state, m

    state, ms = jax.lax.scan(body, state, (idx, jax.random.split(step_key, nb)))
    return state, jax.tree.map(jnp.mean, ms)


# ----------------------------------------------------------------------------- run directory

def save_state(path: Path, state: TrainState, epoch: int) -> None:
    """Params, batch stats and optimizer state as flat numbered leaves in one ``.npz`` (no pickles)."""
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
    arrays = {f"leaf_{i:05d}": np.asarray(a) for i, a in enumerate(leaves)}
    arrays["epoch"] = np.asarray(epoch, np.int64)
    from . import checkpoints

    checkpoints.atomic_write(path, lambda f: np.savez(f, **arrays))


def restore_state(path: Path, template: TrainState) -> tuple[TrainState, int]:
    """Inverse of ``save_state``: fill ``template``'s tree (same model/optimizer) from ``path``."""
    tree = (template.params, template.batch_stats, template.opt_state)
    leaves, treedef = jax.tree.flatten(tree)
    try:
        with np.load(path, allow_pickle=False) as z:
            epoch = int(z["epoch"])
            loaded = [z[f"leaf_{i:05d}"] for i in range(len(leaves))]
            extra = len(z.files) - 1 - len(leaves)
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise RunError(f"{path}: corrupt training state ({type(e).__name__}: {e}); "
                       "delete the run directory and train again") from None
    bad = [i for i, (a, b) in enumerate(zip(loaded, leaves)) if a.shape != np.shape(b)]
    if bad or extra:
        raise RunError(f"{path}: the saved training state does not match this model/optimizer "
                       f"({'leaf %d has shape %s' % (bad[0], loaded[bad[0]].shape) if bad else 'extra leaves'})")
    params, batch_stats, opt_state = jax.tree.unflatten(
        treedef, [jnp.asarray(a, dtype=jnp.asarray(b).dtype) for a, b in zip(loaded, leaves)])
    return template.replace(params=params, batch_stats=batch_stats, opt_state=opt_state), epoch


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse ``run_dir/run.json``; clear RunError when the folder or file is missing or corrupt."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist; train one with `ibau-jax attack --out {run_dir}`")
    path = run_dir / RUN_JSON
    if not path.is_file():
        raise RunError(f"{run_dir} is not a training run: {RUN_JSON} is missing "
                       f"(it is written after the first epoch); train with `ibau-jax attack --out {run_dir}`")
    try:
        run = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is corrupt (not valid JSON: {e}); delete {run_dir} and train again") from None
    if not isinstance(run, dict) or not {"config", "epochs_done", "history"} <= set(run):
        raise RunError(f"{path} is corrupt (expected keys config, epochs_done, history); "
                       f"delete {run_dir} and train again")
    return run


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two run configs (sorted)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _json_ready(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass(frozen=True)
class EvalSets:
    """What ``metrics.evaluate`` needs: clean images/labels and triggered images with their targets."""

    acc_x: np.ndarray        # (N, H, W, C) float32 in [0, 1]
    acc_y: np.ndarray        # (N,)
    asr_x: np.ndarray        # (M, H, W, C) triggered
    asr_t: np.ndarray        # (M,) attack labels
    asr_true: np.ndarray     # (M,) true labels (for asr_nontarget)

    def evaluate(self, model: nn.Module, variables: PyTree) -> dict[str, float]:
        from . import metrics

        return metrics.evaluate(model.apply, variables, self.acc_x, self.acc_y, self.asr_x, self.asr_t,
                                self.asr_true)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, config: TrainConfig, *,
          eval_sets: EvalSets | None = None, run_dir: str | os.PathLike | None = None,
          run_config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
          resume: bool = False, quiet: bool = False, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train ``model`` on x (N, H, W, C) float32 in [0, 1], y (N,) for ``config.epochs`` epochs.

    With ``run_dir``: after every epoch writes ``model.npz`` (``checkpoints.save_checkpoint``,
    ``meta`` must hold model and num_classes), ``train_state.npz`` and ``run.json``
    (``{'config': run_config, 'epochs_done', 'history', 'meta'}``), each atomically.
    ``resume=True`` continues from the last finished epoch; a ``run_config`` different from the
    saved one raises RunError naming the differing keys. ``stop_after=e`` returns after epoch e
    (training in slices; tests use it to simulate an interruption). Returns (state, history).
    """
    from tqdm import tqdm

    from . import checkpoints

    n = x.shape[0]
    steps = n // config.batch_size
    if steps < 1:
        raise ValueError(f"{n} training images are fewer than one batch of {config.batch_size}; "
                         "lower --batch-size")
    run_config = _json_ready({**dataclasses.asdict(config), **(run_config or {})})
    state = create_state(model, config, steps, tuple(x.shape[1:]))
    history: list[dict[str, Any]] = []
    start = 0
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        if resume:
            run = read_run(run_dir)
            diff = config_diff(run["config"], run_config)
            if diff:
                detail = ", ".join(f"{k}: saved {run['config'].get(k)!r} vs now {run_config.get(k)!r}" for k in diff)
                raise RunError(f"cannot resume {run_dir}: the configuration differs in {diff} ({detail}); "
                               "pass the original flags or a new --out")
            if not (run_dir / STATE_NPZ).is_file():
                raise RunError(f"{run_dir}: {STATE_NPZ} is missing; the run cannot be resumed, train again")
            state, start = restore_state(run_dir / STATE_NPZ, state)
            if start != run["epochs_done"]:
                raise RunError(f"{run_dir}: {STATE_NPZ} is at epoch {start} but {RUN_JSON} says "
                               f"{run['epochs_done']} (interrupted while saving); train again")
            history = list(run["history"])
            log(f"resuming {run_dir} after epoch {start}/{config.epochs}")
        elif (run_dir / RUN_JSON).exists():
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose a new --out")

    xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    base_key = jax.random.PRNGKey(config.seed)
    bar = tqdm(total=(config.epochs - start) * steps * config.batch_size, unit="img", unit_scale=True,
               desc="training", dynamic_ncols=True, disable=quiet)
    on_step = None if quiet else (lambda loss: bar.update(config.batch_size))
    for epoch in range(start + 1, config.epochs + 1):
        t0 = time.perf_counter()
        # Per-epoch keys derive from (seed, epoch) only, so a resumed run sees the same randomness.
        state, m = train_epoch(state, xs, ys, jax.random.fold_in(base_key, epoch), config.batch_size,
                               config.crop_pad, config.flip, on_step)
        rec: dict[str, Any] = {"epoch": epoch, "loss": float(m["loss"]), "train_acc": float(m["acc"]),
                               "seconds": round(time.perf_counter() - t0, 3)}
        if not np.isfinite(rec["loss"]):
            raise ValueError(f"epoch {epoch}: the loss is not finite; lower --lr")
        if eval_sets is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
            rec.update(eval_sets.evaluate(model, {"params": state.params, "batch_stats": state.batch_stats}))
        history.append(rec)
        bar.set_postfix_str(f"epoch {epoch}/{config.epochs} loss {rec['loss']:.3f}"
                            + (f" acc {rec['clean_acc']:.3f} asr {rec['asr_all']:.3f}" if "clean_acc" in rec else ""))
        if not quiet:
            bar.write(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
        if run_dir is not None:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            checkpoints.save_checkpoint(run_dir / MODEL_NPZ, jax.device_get(variables),
                                        {**(meta or {}), "epoch": epoch})
            save_state(run_dir / STATE_NPZ, state, epoch)
            # run.json last: it is the commit record of the epoch.
            run = {"config": run_config, "epochs_done": epoch, "history": history, "meta": meta or {},
                   "checkpoint": MODEL_NPZ}
            checkpoints.atomic_write(run_dir / RUN_JSON,
                                     lambda f: f.write((json.dumps(run, indent=2) + "\n").encode()))
        if stop_after is not None and epoch >= stop_after:
            break
    bar.close()
    return state, history
