"""Backdoor attacks: one ``Attack`` type and one registry of named attacks.

    attack = attacks.get("badnets", num_classes=10, target=8)      # or make_attack (same function)
    poisoned = attacks.poison_dataset(x_train, y_train, attack, ratio=0.1, seed=0)
    asr_x, asr_y, keep = attacks.asr_test_set(x_test, y_test, attack)

Registered attacks (``ATTACK_NAMES``): badnets, badnets_all2all, blend, the original I-BAU file
triggers trojan_sq, trojan_wm, l0_inv, l2_inv (read from ``trigger_dir``; poisoned =
clip(x * keep + png / 255, 0, 1)), sig and wanet; see ``attacks.triggers`` and docs/attacks.md.

A new attack is one module with a builder ``build(spec: AttackSpec, *, option=default, ...) ->
Attack`` plus one ``register(name, build)`` call; its keyword-only parameters are its options.

Modules: ``base`` (Attack, AttackSpec, AttackError, apply_trigger, check_target), ``triggers``
(the builders), ``warp`` (WaNet's grids and ``warp.warp``, grid_sample), ``poison`` (poison_dataset, asr_test_set).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Mapping, Sequence

from .. import typed_values
from .base import Attack, AttackError, AttackSpec, apply_trigger, check_target
from .poison import PoisonedSet, asr_test_set, asr_true_labels, poison_dataset
from .triggers import (FILE_TRIGGERS, badnets_patch, build_badnets, build_badnets_all2all, build_blend,
                       build_file_trigger, build_multi_trigger, build_sig, build_wanet, checkerboard_patch,
                       read_file_trigger)
from .warp import bicubic_matrix, identity_grid, wanet_grid  # ``attacks.warp`` stays the module

Builder = Callable[..., Attack]

_REGISTRY: dict[str, tuple[Builder, dict[str, Any]]] = {}  # name -> (builder, its option defaults)
ATTACK_NAMES: tuple[str, ...] = ()  # the registered names, in registration order (kept in sync)


def _option_defaults(name: str, builder: Builder) -> dict[str, Any]:
    """A builder's options: its keyword-only parameters after ``spec``, each with its default."""
    if not callable(builder):
        raise AttackError(f"register({name!r}, ...): the builder must be callable, got {builder!r}")
    params = list(inspect.signature(builder).parameters.values())
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise AttackError(f"register({name!r}, ...): the builder must take the AttackSpec as its first "
                          f"positional parameter: def build(spec, *, option=default, ...)")
    defaults = {}
    for p in params[1:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            raise AttackError(f"register({name!r}, ...): builder parameter {p.name!r} must be keyword-only "
                              f"with a default (def build(spec, *, {p.name}=default))")
        defaults[p.name] = p.default
    return defaults


def register(name: str, builder: Builder) -> Builder:
    """Register attack ``name``, built by ``builder(spec, **options) -> Attack``; returns ``builder``.

    The builder's keyword-only parameters (after ``spec: AttackSpec``) are the attack's options
    and their defaults. A name can be registered once (``unregister`` it first to replace it).
    """
    global ATTACK_NAMES
    if not isinstance(name, str) or not name.isidentifier():
        raise AttackError(f"attack name {name!r} must be an identifier such as 'my_patch'")
    if name in _REGISTRY:
        raise AttackError(f"attack {name!r} is already registered; unregister({name!r}) first to replace it")
    _REGISTRY[name] = (builder, _option_defaults(name, builder))
    ATTACK_NAMES = tuple(_REGISTRY)
    return builder


def unregister(name: str) -> None:
    """Remove attack ``name`` from the registry (AttackError when it is not registered)."""
    global ATTACK_NAMES
    if name not in _REGISTRY:
        raise AttackError(f"attack {name!r} is not registered; registered: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]
    ATTACK_NAMES = tuple(_REGISTRY)


def option_defaults(name: str) -> dict[str, Any]:
    """Attack ``name``'s options and their defaults (AttackError for an unknown name)."""
    if name not in _REGISTRY:
        raise AttackError(f"unknown attack {name!r}; choose one of {', '.join(_REGISTRY)}")
    return dict(_REGISTRY[name][1])


def _typed(name: str, key: str, default: Any, value: Any) -> Any:
    """``value`` as the type of ``default`` (``typed_values.convert``); AttackError otherwise."""
    kind = type(default) if isinstance(default, (bool, int, float)) else str
    try:
        return typed_values.convert(value, kind)
    except ValueError as e:
        raise AttackError(f"attack {name!r} option {key} must be {e}, got {value!r}") from None


def parse_options(name: str, options: Mapping[str, Any] | Sequence[str] = ()) -> dict[str, Any]:
    """Attack options from a mapping (a config file) or ``KEY=VALUE`` strings (the command
    line's ``--attack-option``), typed as each option's default (int, float, bool, str) and
    checked: AttackError naming the option and the fix for an unknown key or a bad value.
    Only the given options are returned (``get`` fills in the defaults)."""
    defaults = option_defaults(name)
    if isinstance(options, Mapping):
        items = list(options.items())
    else:
        items = []
        for pair in options:
            key, sep, value = str(pair).partition("=")
            if not sep or not key.strip():
                raise AttackError(f"--attack-option {pair!r}: expected KEY=VALUE (attack {name!r} options: "
                                  f"{', '.join(defaults) or 'none'})")
            items.append((key.strip(), value.strip()))
    out = {}
    for key, value in items:
        if key not in defaults:
            raise AttackError(f"attack {name!r} has no option {key!r}; its options: {', '.join(defaults) or 'none'}")
        out[key] = _typed(name, key, defaults[key], value)
    return out


def get(name: str, *, num_classes: int, target: int = 0, image_shape: tuple[int, int, int] = (32, 32, 3),
        trigger_dir: str | os.PathLike | None = None, seed: int = 0, **options) -> Attack:
    """Build the registered attack ``name``; ``options`` override its builder's defaults.

    ``seed`` fixes the random parts of the trigger (Blend's noise image, WaNet's warping field);
    ``trigger_dir`` is needed by the file triggers (trojan_sq, trojan_wm, l0_inv, l2_inv).
    The returned ``Attack.params`` holds every option, defaults filled in. Raises AttackError
    (naming the fix) for an unknown name or option, num_classes < 2, a target outside
    0..num_classes-1, an image_shape that is not (H, W, C), or a builder's own check.
    """
    if name not in _REGISTRY:
        raise AttackError(f"unknown attack {name!r}; choose one of {', '.join(_REGISTRY)}")
    if int(num_classes) < 2:
        raise AttackError(f"num_classes must be at least 2, got {num_classes}")
    num_classes = int(num_classes)
    target = check_target(target, num_classes)
    image_shape = tuple(int(v) for v in image_shape)
    if len(image_shape) != 3:
        raise AttackError(f"image_shape must be (H, W, C), got {image_shape}")
    builder, defaults = _REGISTRY[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise AttackError(f"attack {name!r} has no option(s) {', '.join(unknown)}; its options: {allowed}")
    resolved = {**defaults, **options}
    spec = AttackSpec(name=name, num_classes=num_classes, target=target, image_shape=image_shape,
                      trigger_dir=trigger_dir, seed=seed)
    attack = builder(spec, **resolved)
    if not isinstance(attack, Attack):
        raise TypeError(f"the builder of attack {name!r} returned {type(attack).__name__}, not an Attack")
    # the options first, then what the builder adds (e.g. the seed of a random trigger)
    return dataclasses.replace(attack, params={**resolved, **attack.params})


make_attack = get  # the name most call sites use

register("badnets", build_badnets)
register("badnets_all2all", build_badnets_all2all)
register("blend", build_blend)
for _name in ("trojan_sq", "trojan_wm", "l0_inv", "l2_inv"):
    register(_name, build_file_trigger)
register("sig", build_sig)
register("wanet", build_wanet)
register("multi_trigger", build_multi_trigger)
del _name

__all__ = [
    "ATTACK_NAMES", "Attack", "AttackError", "AttackSpec", "Builder", "FILE_TRIGGERS", "PoisonedSet",
    "apply_trigger", "asr_test_set", "asr_true_labels", "badnets_patch", "bicubic_matrix", "check_target",
    "checkerboard_patch", "get", "identity_grid", "make_attack", "option_defaults", "parse_options",
    "poison_dataset", "read_file_trigger", "register", "unregister", "wanet_grid",
]
