"""The defense framework: registry, --set parsing, the one round loop, the result type."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import defenses
from ibau_jax.defenses import base
from ibau_jax.defenses.ibau import IBAU, IBAUConfig
from ibau_jax.errors import ConfigError, UserError


def test_registry_builds_configured_defenses():
    d = defenses.get("ibau", rounds=2, outer_lr=3e-3)
    assert isinstance(d, IBAU) and d.config == IBAUConfig(rounds=2, outer_lr=3e-3)
    assert set(defenses.names()) >= {"ibau", "ft"}
    assert defenses.get("ft").name == "ft"


def test_unknown_defense_and_field_name_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown defense 'no_such'; registered defenses: ibau, ft, nc, tabor, deepinspect, fp, nad, anp, sau"):
        defenses.get("no_such")
    with pytest.raises(ConfigError, match="no field.*'lr'.*valid fields: batch_size, K"):
        defenses.get("ibau", lr=1.0)


def test_parse_overrides_types_and_errors():
    o = defenses.parse_overrides("ibau", ["rounds=3", "outer_lr=2e-3", "radius=none", "solver=gmres",
                                          "clip_images=true", "solver_maxiter=50"])
    assert o == {"rounds": 3, "outer_lr": 2e-3, "radius": None, "solver": "gmres", "clip_images": True,
                 "solver_maxiter": 50}
    assert defenses.parse_overrides("ft", ["epochs=2", "flip=false"]) == {"epochs": 2, "flip": False}
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        defenses.parse_overrides("ibau", ["rounds"])
    with pytest.raises(ConfigError, match="rounds='x'"):
        defenses.parse_overrides("ibau", ["rounds=x"])
    with pytest.raises(ConfigError, match="valid fields"):
        defenses.parse_overrides("ibau", ["nope=1"])
    with pytest.raises(ConfigError, match="clip_images='maybe'"):
        defenses.parse_overrides("ibau", ["clip_images=maybe"])


def test_run_rounds_loop():
    """State threads through the rounds, consts are arguments, callback output joins the record,
    compilation is timed apart, and non-finite weights stop the loop with the hint."""
    @jax.jit
    def step(state, inp, scale):
        new = state * scale + inp
        return new, {"sum": jnp.sum(new)}

    calls = []
    res = base.run_rounds(step, jnp.ones(3), [jnp.full(3, 1.0), jnp.full(3, 2.0)], consts=(jnp.float32(2.0),),
                          variables_of=lambda s: np.asarray(s),
                          record_of=lambda r, aux: {"sum": float(aux["sum"])},
                          callback=lambda r, v, rec: calls.append((r, v.tolist())) or {"cb": r})
    np.testing.assert_array_equal(res.state, [8.0, 8.0, 8.0])  # (1*2+1)*2+2
    assert calls == [(1, [3.0, 3.0, 3.0]), (2, [8.0, 8.0, 8.0])]
    assert [h["sum"] for h in res.history] == [9.0, 24.0] and res.history[1]["cb"] == 2
    assert res.compile_seconds > 0
    with pytest.raises(base.DivergenceError, match="round 2 produced non-finite weights; lower lr"):
        base.run_rounds(step, jnp.ones(3), [jnp.zeros(3), jnp.full(3, jnp.inf)], consts=(jnp.float32(1.0),),
                        variables_of=lambda s: np.asarray(s), divergence_hint="lower lr")
    assert issubclass(base.DivergenceError, UserError)


def test_clean_set_checks():
    x = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(ConfigError, match=r"labels must lie in 0..9"):
        defenses.CleanSet(x, np.array([0, 1, 2, 10]), 10)
    with pytest.raises(ConfigError, match="float"):
        defenses.CleanSet(x.astype(np.uint8), np.zeros(4, int), 10)
    with pytest.raises(ConfigError, match=r"\(N,\)"):
        defenses.CleanSet(x, np.zeros(3, int), 10)
