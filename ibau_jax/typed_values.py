"""A setting's value converted to its declared scalar type: bool, int, float or str.

One rule for every place a user types a setting: ``--set FIELD=VALUE`` (a defense config field,
typed by its annotation), ``--attack-option KEY=VALUE`` and a bench config's
``attack_options`` (typed by the attack builder's default). Values come as command-line text or
as TOML scalars; numbers must be finite; an int takes a whole float (``4.0``, as TOML may
write it) but not ``4.5``; booleans are spelled true/false, 1/0 or yes/no.

    convert("0.5", float) -> 0.5        convert("yes", bool) -> True
    convert("none", int, optional=True) -> None
    convert("nan", float)  -> ValueError("a finite number")

The ValueError's message is what was expected, for the caller to put in its own error (which
names the setting and where it came from).
"""
from __future__ import annotations

import math
import re
from typing import Any

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no")
NONE = ("none", "null")


def expected(kind: type) -> str:
    """What a value of ``kind`` must be, in words ("an integer", ...)."""
    return {bool: "true or false", int: "an integer", float: "a finite number"}.get(kind, "a string")


def convert(value: Any, kind: type, *, optional: bool = False) -> Any:
    """``value`` as ``kind`` (bool, int, float; any other kind: str); None for None or the text
    none/null when ``optional``. ValueError(``expected(kind)``) for a value of another kind."""
    text = value.strip().lower() if isinstance(value, str) else None
    if optional and (value is None or text in NONE):
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise ValueError(expected(bool))
    if kind is int and isinstance(value, str):
        if not re.fullmatch(r"[+-]?[0-9]+", value.strip()):  # "4", "-3"; not "4.0" or "1e3" typed
            raise ValueError(expected(int))
        return int(value)
    if kind in (int, float):
        try:
            v = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(expected(kind)) from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (kind is int and v != int(v)):
            raise ValueError(expected(kind))
        return int(v) if kind is int else float(v)
    if not isinstance(value, str):
        raise ValueError(expected(str))
    return value

