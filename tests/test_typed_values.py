"""typed_values.convert: the one rule for typed settings (--set, --attack-option, attack_options)."""
import math

import pytest

from ibau_jax import attacks, defenses, typed_values
from ibau_jax.attacks import AttackError
from ibau_jax.errors import ConfigError


@pytest.mark.parametrize("value, kind, want", [
    ("0.5", float, 0.5), (" 2 ", float, 2.0), (3, float, 3.0), ("1e-3", float, 1e-3),
    ("4", int, 4), ("-3", int, -3), ("+7", int, 7), (4.0, int, 4), (12, int, 12),
    ("true", bool, True), ("No", bool, False), ("1", bool, True), (False, bool, False),
    ("abc", str, "abc"),
])
def test_values_of_each_kind_convert(value, kind, want):
    got = typed_values.convert(value, kind)
    assert got == want and type(got) is kind


@pytest.mark.parametrize("value, kind", [
    ("nan", float), ("inf", float), (math.nan, float), (-math.inf, float), ("x", float), (True, float),
    ("4.0", int), ("1e3", int), ("4.5", int), (4.5, int), ("+-4", int), ("", int), (True, int),
    ("maybe", bool), (1, bool), (3, str),
])
def test_other_values_are_refused_with_what_was_expected(value, kind):
    with pytest.raises(ValueError) as e:
        typed_values.convert(value, kind)
    assert str(e.value) == typed_values.expected(kind)


def test_none_only_where_the_setting_is_optional():
    assert typed_values.convert("None", int, optional=True) is None
    assert typed_values.convert(None, float, optional=True) is None
    with pytest.raises(ValueError):
        typed_values.convert("none", int)


def test_set_and_attack_options_use_the_same_rule():
    # A defense field (typed by annotation) and an attack option (typed by its default) accept and
    # refuse the same spellings, each error naming the setting.
    ft = defenses.defense_class("ft").Config
    assert defenses.base.parse_value(ft, "epochs", "3") == 3
    assert attacks.parse_options("wanet", ["noise=no", "k=5"]) == {"noise": False, "k": 5}
    with pytest.raises(ConfigError, match=r"lr='nan': must be a finite number"):
        defenses.base.parse_value(ft, "lr", "nan")
    with pytest.raises(AttackError, match=r"option s must be a finite number, got 'inf'"):
        attacks.parse_options("wanet", ["s=inf"])
