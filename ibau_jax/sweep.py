"""Seeds × hyperparameter sweeps: mean ± std tables over seeds for every setting.

For I-BAU, ``sweep_rounds`` vmaps (or ``lax.map``s) one I-BAU round over seeds (their masks) and the
numeric hyperparameters in ``defenses.ibau.SWEEPABLE``, ``chunk`` runs per compiled call;
distinct K (or other static fields) are separate compilations in a Python loop. The rounds
of a chunk go through the defenses' one loop (``defenses.base.run_rounds``).

Any other registered defense goes through ``sweep_defense``: one ``run`` per (setting, seed),
settings built from the defense's config (``defenses.get(name, **setting)``); runs of the same
static shapes reuse jax's compilation cache.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding
from .defenses import ibau
from .defenses.base import run_rounds
from .errors import ConfigError

PyTree = Any
METRICS = ("clean_acc", "asr_all", "asr_nontarget", "robust_acc")


def _round_step(fn: Callable[..., ibau.RoundOutput]) -> Callable[..., Any]:
    """``fn`` (``make_hparam_round``) as a ``run_rounds`` step: state (params, opt_state), input masks."""
    @jax.jit
    def step(state, masks, batch_stats, xb, yb, hp):
        out = fn(state[0], batch_stats, state[1], xb, yb, masks, hp)
        return (out.params, out.opt_state), None
    return step


def grid_settings(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of ``{field: values}`` as a list of ``{field: value}`` (K first varies slowest)."""
    names = sorted(grid, key=lambda k: (k != "K", k))
    return [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))]


def _mean_std(vals: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and std (ddof 1) over seeds; None when a seed has no value (e.g. no non-target images)."""
    if any(v is None for v in vals):
        return None, None
    a = np.asarray(vals, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def sweep_rounds(model, config: ibau.IBAUConfig, variables: PyTree, xb: Any, yb: Any, *,
                 seeds: Sequence[int], grid: Mapping[str, Sequence[Any]] | None = None, rounds: int = 1,
                 chunk: int = 8, evaluate_fn: Callable[[PyTree], dict[str, float]] | None = None,
                 mesh: Any = None, keep_params: bool = False,
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
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    if not seeds:
        raise ConfigError("a sweep needs at least one seed (--num-seeds >= 1)")
    grid = dict(grid or {})
    for name in grid:
        if name not in {f.name for f in dataclasses.fields(ibau.IBAUConfig)}:
            raise ConfigError(f"unknown IBAUConfig field {name!r} in the sweep grid")
    traced = sorted(n for n in grid if n in ibau.SWEEPABLE)
    static = sorted((n for n in grid if n not in ibau.SWEEPABLE), key=lambda k: (k != "K", k))
    params0, batch_stats = variables["params"], variables["batch_stats"]
    B = int(np.shape(xb)[0])
    if mesh is not None:
        sharding.check_divisible(int(np.shape(xb)[1]), mesh)
        xb, yb = sharding.shard(mesh, xb, 1), sharding.shard(mesh, yb, 1)
    else:
        xb, yb = jnp.asarray(xb), jnp.asarray(yb)
    masks_of = {s: ibau.seed_masks(s, rounds, B, config, mask_rng) for s in seeds}
    records: list[dict[str, Any]] = []
    for st in grid_settings({n: grid[n] for n in static}) or [{}]:
        cfg = dataclasses.replace(config, **st)
        settings = grid_settings({n: grid[n] for n in traced})
        runs = [(i, s) for i in range(len(settings)) for s in seeds]  # (setting index, seed)
        fn = ibau.make_hparam_round(model, cfg, traced, mesh, strategy)
        step = _round_step(fn)
        tx = cfg.outer_tx()  # the optimizer state's structure does not depend on the (traced) lr
        final: dict[tuple[int, int], PyTree] = {}
        for c0 in range(0, len(runs), chunk):
            part = runs[c0:c0 + chunk]
            part = part + [part[-1]] * (chunk - len(part))  # pad: one compiled shape per setting
            hp = {n: np.asarray([settings[i][n] for i, _ in part], np.float32) for n in traced}
            params = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (chunk, *np.shape(a))), params0)
            opt_state = jax.vmap(tx.init)(jax.tree.map(jnp.asarray, params))
            masks = [np.stack([masks_of[s][r] for _, s in part]) for r in range(rounds)]
            if mesh is not None:
                masks = [sharding.shard(mesh, m, 2) for m in masks]
                params, opt_state, bs = sharding.replicate(mesh, (params, opt_state, batch_stats))
                hp_in = sharding.replicate(mesh, hp)
            else:
                bs, hp_in = batch_stats, hp
            loop = run_rounds(step, (params, opt_state), masks, consts=(bs, xb, yb, hp_in),
                              variables_of=lambda st: None)
            params = loop.state[0]
            host = sharding.to_host(params)
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


def sweep_defense(name: str, base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], seeds: Sequence[int],
                  run_one: Callable[[Any, int], dict[str, float]],
                  on_run: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Defense ``name`` for every (setting, seed): ``run_one(defense, seed) -> metrics``.

    base: config overrides every run shares; grid: ``{field: values}`` of the defense's config
    (every setting is validated by building its config before the first run, so a bad value
    costs no run). Returns one record per setting, as :func:`sweep_rounds` does (per-seed
    metrics and ``{metric}_mean`` / ``{metric}_std`` over seeds).
    """
    from . import defenses

    if not seeds:
        raise ConfigError("a sweep needs at least one seed (--num-seeds >= 1)")
    settings = grid_settings(dict(grid)) or [{}]
    built = [defenses.get(name, **{**base, **st}) for st in settings]  # validates every setting first
    records: list[dict[str, Any]] = []
    total, done = len(settings) * len(seeds), 0
    for st, defense in zip(settings, built):
        per = []
        for s in seeds:
            per.append(run_one(defense, s))
            done += 1
            if on_run is not None:
                on_run(done, total)
        rec: dict[str, Any] = {**st, "seeds": list(seeds), "per_seed": per}
        for m in METRICS:
            rec[f"{m}_mean"], rec[f"{m}_std"] = _mean_std([p[m] for p in per])
        records.append(rec)
    return records


def sweep_markdown(result: dict[str, Any]) -> str:
    """A sweep result's records as a markdown table (mean ± std over seeds)."""
    keys = result["swept"]
    head = "| " + " | ".join(keys) + " | seeds | clean acc | ASR (all) | ASR (non-target) | RA |"
    lines = [f"# {result['config'].get('defense', 'ibau')} sweep: {result['config'].get('attack', '')} on {result['config'].get('dataset', '')}, "
             f"{result['config'].get('rounds', 1)} round(s)", "", head, "|" + "---|" * (len(keys) + 5)]
    for r in result["records"]:
        cells = [f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        cells.append(str(len(r["seeds"])))
        cells += ["–" if r.get(m + "_mean") is None else f"{r[m + '_mean']:.4f} ± {r[m + '_std']:.4f}"
                  for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
