"""DeepInspect (``deepinspect``): a conditional trigger generator, outlier detection on the
generated triggers' sizes, and patching by fine-tuning with generated triggers and TRUE labels.

Chen, Fu, Zhao & Koushanfar, "DeepInspect: A Black-box Trojan Detection and Mitigation Framework
for Deep Neural Networks", IJCAI 2019. No official code exists; TrojanZoo
(``trojanvision/defenses/backdoor/model_inspection/deep_inspect.py``) documents a reading.

1. Data. The paper recovers a substitute training set by model inversion; TrojanZoo instead uses
   a small subset of clean training data. We follow TrojanZoo: the defender's clean set.
2. Trigger generation. One generator G (``trigger_generator.TriggerGenerator``) conditioned on
   every class, trained against the FROZEN model (eval mode) with Adam on

       L(G) = E_{x, z, c} [ CE(f(clip(x + G(z, c), 0, 1)), c) ] + γ · E_{z, c} ‖G(z, c)‖₁,

   the paper's L_trojan (the negative log-likelihood of the target class) plus its perturbation
   term L_pert weighted by γ (the paper's γ₂). The paper's third term, a GAN loss γ₁·L_GAN with a
   discriminator, is off in TrojanZoo (γ₁ = 0, no discriminator) and left out here too. Each step
   stamps a batch of B clean images with G(z, c) for all K classes (K·B images, fresh z per
   image); a round is one pass (epoch) over the clean set, one ``lax.scan`` run through
   ``base.run_rounds`` (compilation timed apart; a non-finite generator is a ``DivergenceError``).
3. Detection. Class c's trigger size s_c = mean over z of ‖G(z, c)‖₁. The paper tests, at a
   significance level, whether the smallest sizes are outliers of the sizes' distribution
   (a double-MAD variant); we use Neural Cleanse's MAD test on the same sizes
   (``anomaly.flag_small``): flagged when the anomaly index |s_c − median| / (1.4826·MAD) exceeds
   ``threshold`` and s_c is below the median. Under the null (normal sizes) the index is a
   standard normal |score|, so threshold 2 is a one-sided test at α ≈ 0.023 (1.645 would be
   α = 0.05).
4. Patching (``mitigate``). The clean set with a fraction of its images stamped with generated
   triggers of the flagged classes, labels kept TRUE (``patching.patched_clean_set``), then the
   ``ft`` defense on it; each fine-tuning epoch is a round of the result. No flagged class: the
   model comes back unchanged.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import sharding
from ..errors import ConfigError, check_finite
from . import anomaly, patching
from .base import CleanSet, DefenseResult, check_one_batch, run_rounds
from .ft import FineTuning
from .trigger_generator import TriggerGenerator

PyTree = Any


@dataclasses.dataclass(frozen=True)
class DeepInspectConfig(patching.PatchingConfig):
    """DeepInspect settings.

    Sources: ``epochs`` 20 passes over the clean data, Adam ``lr`` 0.01, ``noise_dim`` 100,
    ``gamma`` 0.02 on the trigger's L1 norm (summed over pixels and channels) = TrojanZoo's
    ``defense_remask_epoch``, ``defense_remask_lr``, ``noise_dim`` and ``gamma_2`` (its GAN
    weight ``gamma_1`` is 0, as here). ``batch_size`` 32 clean images per step (each stamped for
    every class: K·32 images a step), ``width`` 32 and ``bound`` 1 (|δ| ≤ 1: any image is
    reachable after clipping) = ibau-jax's choices for the smaller generator. ``threshold`` 2 =
    Neural Cleanse's anomaly-index cut (the paper's hypothesis test, see the module docstring);
    ``detect_noise`` 32 draws of z per class for the trigger sizes, ``detect_images`` 1000 clean
    images for the per-class attack success. The mitigation's fields are
    :class:`patching.PatchingConfig`'s (Neural Cleanse's share of patched images: the
    DeepInspect paper does not state one).
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.01
    noise_dim: int = 100
    width: int = 32
    bound: float = 1.0
    gamma: float = 0.02
    threshold: float = 2.0
    detect_noise: int = 32
    detect_images: int = 1000

    def __post_init__(self):
        super().__post_init__()
        for name in ("epochs", "batch_size", "noise_dim", "width", "detect_noise", "detect_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r} (--set {name}=...)")
        for name in ("lr", "bound"):
            if check_finite(name, getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {getattr(self, name)!r} (--set {name}=...)")
        for name in ("gamma", "threshold"):
            if check_finite(name, getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r} (--set {name}=...)")


def generator_loss(gen: TriggerGenerator, gparams: PyTree, logits_fn: Callable[[jax.Array], jax.Array],
                   x: jax.Array, z: jax.Array, gamma: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = mean CE(f(clip(x + G(z_kb, k))), k) + γ · mean ‖G(z_kb, k)‖₁ over classes k and images b.

    x (B, H, W, C) clean images; z (K, B, noise_dim). Returns the loss and its terms
    (``ce``, ``l1``, ``acc``: the share of stamped images classified as their target).
    """
    k, b = z.shape[0], z.shape[1]
    c = jnp.repeat(jnp.arange(k), b)
    delta = gen.apply({"params": gparams}, z.reshape(k * b, -1), c)          # (K·B, H, W, C)
    xp = jnp.clip(jnp.tile(x, (k, 1, 1, 1)) + delta, 0.0, 1.0)
    logits = logits_fn(xp)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, c))
    l1 = jnp.mean(jnp.sum(jnp.abs(delta), axis=(1, 2, 3)))
    acc = jnp.mean((jnp.argmax(logits, -1) == c).astype(jnp.float32))
    return ce + gamma * l1, {"ce": ce, "l1": l1, "acc": acc}


class DeepInspect:
    """``deepinspect``: see the module docstring.

    History: one record per fine-tuning epoch (``ft``'s records), empty when nothing is flagged or
    ``mitigate`` is off. Diagnostics: ``anomaly_index`` (per class), ``trigger_asr`` (per class: the
    share of clean images of other classes sent to the class by its generated triggers),
    ``generator_history`` (per generator epoch: loss, ce, l1, acc, seconds), ``mitigated`` and
    ``patched_images``. Artifacts: ``triggers`` (K, H, W, C), one generated trigger per class.
    """

    name = "deepinspect"
    Config = DeepInspectConfig

    def __init__(self, config: DeepInspectConfig | None = None, on_step: Callable[[Any], None] | None = None):
        self.config = config if config is not None else DeepInspectConfig()
        self.on_step = on_step

    def _ft(self) -> FineTuning:
        return FineTuning(self.config.ft_config(), on_step=self.on_step)

    def num_steps(self, clean_set: CleanSet) -> int:
        """Generator steps plus (with ``mitigate``) the fine-tuning steps, for a progress bar."""
        gen = self.config.epochs * (len(clean_set) // self.config.batch_size)
        return gen + (self._ft().num_steps(clean_set) if self.config.mitigate else 0)

    def check_size(self, n: int) -> None:
        """ConfigError when a clean set of ``n`` images holds less than one generator or
        fine-tuning batch."""
        cfg = self.config
        check_one_batch(n, cfg.batch_size, kind="generator")
        if cfg.mitigate:
            check_one_batch(n, cfg.ft_batch_size, kind="fine-tuning", field="ft_batch_size",
                            other="detect only (--set mitigate=false)")

    def _check(self, clean_set: CleanSet) -> None:
        self.check_size(len(clean_set))
        if clean_set.num_classes < 2:
            raise ConfigError(f"DeepInspect compares classes' triggers and needs >= 2 classes, got {clean_set.num_classes}")

    def run(self, model, variables: PyTree, clean_set: CleanSet, key: jax.Array, *, mesh: Any = None,
            callback=None) -> DefenseResult:
        cfg = self.config
        self._check(clean_set)
        num_classes, n = clean_set.num_classes, len(clean_set)
        xs = np.asarray(clean_set.x, np.float32)
        image_shape = tuple(int(d) for d in xs.shape[1:])
        gen = TriggerGenerator(image_shape, num_classes, cfg.width, cfg.bound)
        k_init, k_train, k_detect, k_patch, k_ft = jax.random.split(key, 5)
        gparams = gen.init(k_init, jnp.zeros((1, cfg.noise_dim)), jnp.zeros((1,), jnp.int32))["params"]
        tx = optax.adam(cfg.lr)
        mvars = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        steps = n // cfg.batch_size
        on_step = self.on_step

        def logits_fn(mv, x):
            return model.apply(mv, x, train=False)

        @jax.jit
        def epoch(state, k, xs, mv):
            """One pass over the clean set: ``steps`` Adam steps of the generator (a lax.scan)."""
            kp, ks = jax.random.split(k)
            idx = jax.random.permutation(kp, xs.shape[0])[: steps * cfg.batch_size].reshape(steps, cfg.batch_size)

            def body(carry, inp):
                gp, opt = carry
                i, kz = inp
                z = jax.random.normal(kz, (num_classes, cfg.batch_size, cfg.noise_dim))
                (loss, terms), g = jax.value_and_grad(generator_loss, argnums=1, has_aux=True)(
                    gen, gp, lambda x: logits_fn(mv, x), xs[i], z, cfg.gamma)
                updates, opt = tx.update(g, opt, gp)
                if on_step is not None:
                    jax.debug.callback(on_step, loss)
                return (optax.apply_updates(gp, updates), opt), {"loss": loss, **terms}

            state, aux = jax.lax.scan(body, state, (idx, jax.random.split(ks, steps)))
            return state, jax.tree.map(jnp.mean, aux)

        state = (gparams, tx.init(gparams))
        xs_dev, mv_dev = (sharding.replicate(mesh, (xs, mvars)) if mesh is not None
                          else (jnp.asarray(xs), jax.tree.map(jnp.asarray, mvars)))
        if mesh is not None:  # the generator phase runs replicated; fine-tuning is data parallel
            state = sharding.replicate(mesh, state)
        keys = [jax.random.fold_in(k_train, e) for e in range(1, cfg.epochs + 1)]
        hint = "lower lr (--set lr=...) or gamma (--set gamma=...)"
        loop = run_rounds(epoch, state, keys, consts=(xs_dev, mv_dev),
                          variables_of=lambda s: sharding.to_host(s[0]),
                          record_of=lambda r, a: {k: float(v) for k, v in sharding.to_host(a).items()},
                          divergence_hint=f"the trigger generator diverged; {hint}")
        gparams = loop.state[0]
        seconds, compile_seconds = loop.seconds, loop.compile_seconds

        # Detection: per-class trigger sizes and the attack success of the generated triggers.
        t0 = time.perf_counter()
        sizes, trigger_asr, samples = self._detect(gen, gparams, logits_fn, mvars, xs, np.asarray(clean_set.y),
                                                   k_detect, num_classes)
        if not np.isfinite(sizes).all():
            raise ConfigError(f"the generated triggers have non-finite sizes {sizes.tolist()}: the trigger generator "
                              f"diverged; {hint}")
        index = anomaly.anomaly_index(sizes)
        flagged = anomaly.flag_small(sizes, cfg.threshold)
        seconds += time.perf_counter() - t0

        diagnostics: dict[str, Any] = {
            "anomaly_index": [float(a) for a in index], "trigger_asr": [float(a) for a in trigger_asr],
            "threshold": cfg.threshold, "generator_history": loop.history,
            "generator_seconds": round(loop.seconds, 3), "generator_compile_seconds": round(loop.compile_seconds, 3),
            "devices": sharding.num_devices(mesh)}
        history: list[dict[str, Any]] = []
        out_vars = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        if not flagged or not cfg.mitigate:
            diagnostics.update(mitigated=False, patched_images=0,
                               reason="no class flagged" if not flagged else "mitigate is off")
        else:
            gen_apply = jax.jit(lambda gp, z, c: gen.apply({"params": gp}, z, c))
            zrng = np.random.default_rng(int(jax.random.randint(k_patch, (), 0, 2**31 - 1)))

            def stamp(x: np.ndarray, c: int) -> np.ndarray:
                z = zrng.standard_normal((x.shape[0], cfg.noise_dim)).astype(np.float32)
                delta = np.asarray(gen_apply(gparams, z, np.full(x.shape[0], c, np.int32)))
                return np.clip(x + delta, 0.0, 1.0)

            patched, which = patching.patched_clean_set(clean_set, stamp, flagged, cfg.patch_fraction, zrng)
            ft = self._ft().run(model, out_vars, patched, k_ft, mesh=mesh, callback=callback)
            out_vars, history = ft.variables, ft.history
            seconds += ft.seconds
            compile_seconds += ft.compile_seconds
            diagnostics.update(mitigated=True, patched_images=int((which >= 0).sum()))
        return DefenseResult(sharding.to_host(out_vars), history, diagnostics, seconds, compile_seconds,
                             flagged_classes=flagged, class_scores=[float(s) for s in sizes],
                             artifacts={"triggers": samples})

    def _detect(self, gen, gparams, logits_fn, mvars, xs, ys, key, num_classes):
        """(sizes (K,), trigger_asr (K,), one sample trigger per class (K, H, W, C))."""
        cfg = self.config
        kz, ka = jax.random.split(key)
        z = jax.random.normal(kz, (num_classes, cfg.detect_noise, cfg.noise_dim))
        apply = jax.jit(lambda gp, z, c: gen.apply({"params": gp}, z, c))
        deltas = [np.asarray(apply(gparams, z[c], jnp.full((cfg.detect_noise,), c))) for c in range(num_classes)]
        sizes = np.array([np.abs(d).sum(axis=(1, 2, 3)).mean() for d in deltas])
        samples = np.stack([d[0] for d in deltas])
        m = min(len(xs), cfg.detect_images)
        x, y = xs[:m], ys[:m]

        @jax.jit
        def hits(gp, mv, x, c, k):
            zz = jax.random.normal(k, (x.shape[0], cfg.noise_dim))
            d = gen.apply({"params": gp}, zz, jnp.full((x.shape[0],), c))
            return jnp.argmax(logits_fn(mv, jnp.clip(x + d, 0.0, 1.0)), -1) == c

        chunk = 250
        asr = []
        for c in range(num_classes):
            kc = jax.random.fold_in(ka, c)
            h = np.concatenate([np.asarray(hits(gparams, mvars, x[s:s + chunk], c, jax.random.fold_in(kc, s)))
                                for s in range(0, m, chunk)])
            other = y != c
            asr.append(float(h[other].mean()) if other.any() else float("nan"))
        return sizes, np.array(asr), samples
