"""The Defense interface, its result, and the one loop every round-based defense runs.

A defense is an object with a frozen config dataclass and one method,

    run(model, variables, clean_set, key, *, mesh=None, callback=None) -> DefenseResult

``model``: a flax module, ``model.apply(variables, x, train=False) -> logits``;
``variables``: ``{'params', 'batch_stats'}``; ``clean_set``: the defender's clean images
(:class:`CleanSet`); ``key``: a jax PRNG key (``PRNGKey(seed)``); ``mesh``: an optional
device mesh (``sharding.mesh_for``), any device count; ``callback(round, variables, record)``
is called on the host after every round or epoch with the new variables (e.g. to evaluate
and write results) and may return a dict that is merged into that round's record.

Round-based defenses express one round as a pure jitted ``step(state, inputs) -> (state, aux)``
and hand it to :func:`run_rounds`, the one loop: it compiles ahead of time (compile time
reported separately), times each round, refuses non-finite weights, calls the callback and
keeps the history.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import jax
import numpy as np

from .. import interrupt, typed_values
from ..errors import ConfigError, UserError

PyTree = Any
Callback = Callable[[int, PyTree, dict], "dict | None"]


class DivergenceError(UserError):
    """A defense produced non-finite weights; the message names the setting to change."""


@dataclasses.dataclass(frozen=True)
class CleanSet:
    """The defender's clean data: x (N, H, W, C) float32 in [0, 1], y (N,) int labels."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self):
        x, y = np.asarray(self.x), np.asarray(self.y)
        if x.ndim != 4 or y.shape != (x.shape[0],):
            raise ConfigError(f"a clean set needs images (N, H, W, C) and labels (N,), got {x.shape} and {y.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"clean images must be float in [0, 1], got {x.dtype} (use data.to_float)")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise ConfigError(f"clean labels must lie in 0..{self.num_classes - 1}, got {y.min()}..{y.max()}")

    def __len__(self) -> int:
        return int(np.shape(self.y)[0])


@dataclasses.dataclass
class DefenseResult:
    """What a defense returns.

    variables: the defended ``{'params', 'batch_stats'}`` (host numpy);
    history: one record per round or epoch (``round``, ``seconds`` and the defense's figures,
      plus whatever the callback returned);
    diagnostics: run-level figures (e.g. the hypergradient solver's residuals);
    seconds: wall time of the work, compilation excluded; compile_seconds: compilation;
    flagged_classes / class_scores: detection defenses only;
    artifacts: arrays that are results but not JSON figures (I-BAU's last δ, reversed triggers).
    """

    variables: PyTree
    history: list[dict[str, Any]]
    diagnostics: dict[str, Any]
    seconds: float
    compile_seconds: float
    flagged_classes: list[int] | None = None
    class_scores: list[float] | None = None
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)


class Defense(Protocol):
    """The interface of every defense (see the module docstring)."""

    name: ClassVar[str]
    config: Any

    def check_size(self, n: int) -> Any:
        """Raise ``ConfigError`` when a clean set of ``n`` images is too small for this
        configuration (one batch, a held-out split); cheap, so callers run it for every setting
        before any data is read or program compiled. ``run`` calls it too."""
        ...

    def run(self, model: Any, variables: PyTree, clean_set: CleanSet, key: jax.Array, *,
            mesh: Any = None, callback: Callback | None = None) -> DefenseResult: ...


def check_one_batch(n: int, batch_size: int, *, kind: str = "", field: str = "batch_size",
                    other: str = "use more clean images (--n-clean)") -> None:
    """ConfigError when a clean set of ``n`` images holds less than one batch of ``batch_size``.

    ``kind`` names the batch where a defense has several ("SAU", "fine-tuning"), ``field`` the
    config field that sets its size, ``other`` the alternative fix."""
    if n < batch_size:
        batch = f"{kind} batch" if kind else "batch"
        raise ConfigError(f"the clean set has {n} images, fewer than one {batch} of {batch_size}; "
                          f"lower {field} (--set {field}=...) or {other}")


def all_finite(tree: PyTree) -> bool:
    return all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree.leaves(tree))


@dataclasses.dataclass
class LoopResult:
    state: Any
    history: list[dict[str, Any]]
    seconds: float
    compile_seconds: float


def run_rounds(step: Any, state: Any, inputs: Sequence[Any], *, consts: tuple = (),
               variables_of: Callable[[Any], PyTree],
               record_of: Callable[[int, Any], dict[str, Any]] = lambda r, aux: {},
               callback: Callback | None = None, divergence_hint: str = "",
               on_round_start: Callable[[int], None] | None = None) -> LoopResult:
    """The round loop: ``state, aux = step(state, inputs[r], *consts)`` for every round r.

    ``consts``: arrays every round reads (e.g. the clean batches), passed as arguments so they
    are never baked into the program as constants.

    ``step``: a ``jax.jit``-ed function, compiled once ahead of time on the first round's
    arguments (``compile_seconds``); ``variables_of(state)``: the model variables of a state,
    as host numpy; ``record_of(r, aux)``: the round's figures. After each round the variables
    must be finite (else :class:`DivergenceError` with ``divergence_hint``), then
    ``callback(r, variables, record)`` runs and its returned dict joins the record.
    Rounds are numbered from 1. A stop requested with Ctrl-C (``interrupt.graceful``) raises
    ``interrupt.Interrupted`` at the next round boundary, compilation included.
    """
    t0 = time.perf_counter()
    compiled = step.lower(state, inputs[0], *consts).compile() if inputs else None
    compile_seconds = time.perf_counter() - t0
    history: list[dict[str, Any]] = []
    seconds = 0.0
    for r, inp in enumerate(inputs, start=1):
        interrupt.check()
        if on_round_start is not None:
            on_round_start(r)
        t0 = time.perf_counter()
        state, aux = jax.block_until_ready(compiled(state, inp, *consts))
        dt = time.perf_counter() - t0
        seconds += dt
        variables = variables_of(state)
        if not all_finite(variables):
            raise DivergenceError(f"round {r} produced non-finite weights" + (f"; {divergence_hint}" if divergence_hint else ""))
        record = {"round": r, "seconds": round(dt, 3), **record_of(r, aux)}
        if callback is not None:
            record.update(callback(r, variables, record) or {})
        history.append(record)
    return LoopResult(state, history, seconds, compile_seconds)


def config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def parse_value(config_cls: type, name: str, text: str) -> Any:
    """A ``--set name=text`` value converted to the type of ``config_cls``'s field ``name``
    (``typed_values.convert``: bool, int, float, or the text; none/null for an Optional field)."""
    fields = config_fields(config_cls)
    if name not in fields:
        raise ConfigError(f"{config_cls.__name__} has no field {name!r}; valid fields: {', '.join(fields)}")
    default = fields[name].default
    t = str(fields[name].type)
    if "bool" in t:
        kind: type = bool
    elif t.startswith("int") or (isinstance(default, int) and not isinstance(default, bool) and "float" not in t):
        kind = int
    elif "float" in t or isinstance(default, float):
        kind = float
    else:
        kind = str
    try:
        return typed_values.convert(text, kind, optional="None" in t or default is None)
    except ValueError as e:
        raise ConfigError(f"{name}={text!r}: must be {e} (a field of type {t})") from None


def build_config(config_cls: type, overrides: Mapping[str, Any]) -> Any:
    """``config_cls(**overrides)``; an unknown field is a ConfigError naming the valid ones."""
    fields = config_fields(config_cls)
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ConfigError(f"{config_cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; "
                          f"valid fields: {', '.join(fields)}")
    return config_cls(**overrides)
