"""The defense registry: ``get(name, **overrides)`` builds a registered defense with its config.

    from ibau_jax import defenses
    d = defenses.get("ibau", rounds=1)                 # IBAU(IBAUConfig(rounds=1))
    result = d.run(model, variables, clean_set, jax.random.PRNGKey(0))

A new defense is one module (a class with ``name``, a frozen ``Config`` dataclass and ``run``,
see ``base.Defense``) plus one entry in ``REGISTRY`` below (docs/architecture.md).
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError
from .base import CleanSet, Defense, DefenseResult, DivergenceError, build_config, parse_value, run_rounds

# name -> "module:Class" (imported on first use, so listing names costs no jax import)
REGISTRY: dict[str, str] = {
    "ibau": "ibau_jax.defenses.ibau:IBAU",
    "ft": "ibau_jax.defenses.ft:FineTuning",
    "nc": "ibau_jax.defenses.nc:NeuralCleanse",
    "tabor": "ibau_jax.defenses.tabor:Tabor",
    "deepinspect": "ibau_jax.defenses.deepinspect:DeepInspect",
    "fp": "ibau_jax.defenses.fp:FinePruning",
    "nad": "ibau_jax.defenses.nad:NAD",
    "anp": "ibau_jax.defenses.anp:ANP",
    "sau": "ibau_jax.defenses.sau:SAU",
}


def names() -> list[str]:
    """The registered defense names."""
    return list(REGISTRY)


def defense_class(name: str) -> type:
    """The class registered under ``name``; ConfigError naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown defense {name!r}; registered defenses: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def register(name: str, target: str) -> None:
    """Register ``"package.module:Class"`` under ``name`` (a plug-in from outside this package)."""
    REGISTRY[name] = target


def get(name: str, **overrides: Any) -> Defense:
    """The defense ``name`` with its config's fields overridden (validated by the config)."""
    cls = defense_class(name)
    return cls(build_config(cls.Config, overrides))


def parse_overrides(name: str, pairs: list[str]) -> dict[str, Any]:
    """``["field=value", ...]`` (the CLI's ``--set``) -> typed overrides for defense ``name``'s config."""
    cls = defense_class(name)
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected FIELD=VALUE")
        k, v = pair.split("=", 1)
        out[k.strip()] = parse_value(cls.Config, k.strip(), v)
    return out


__all__ = ["CleanSet", "Defense", "DefenseResult", "DivergenceError", "REGISTRY", "defense_class", "get",
           "names", "parse_overrides", "register", "run_rounds"]
