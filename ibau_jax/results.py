"""The result contract of a defense run, its markdown view, and safe writing of result files.

``ibau-jax defend --out RESULT.json`` (and ``unlearn``) writes, atomically after every round,

    {"defense": "ibau", "config": {...}, "run": {...},
     "before": {"clean_acc", "asr_all", "asr_nontarget", "robust_acc"},
     "after":  {... the same four ...}, "der": float,
     "history": [{"round": 1, "seconds": ..., "clean_acc": ..., ...}, ...],
     "seconds": float, "compile_seconds": float, "diagnostics": {...},
     "complete": bool}

plus ``flagged_classes`` and ``class_scores`` from detection defenses. ``der`` is computed from
``asr_all`` and ``clean_acc`` (``metrics.der``). Every later defense and the evaluation
command read these names. JSON is strict: a non-finite number is written as null.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError

CONTRACT_KEYS = ("defense", "config", "before", "after", "der", "history", "seconds", "compile_seconds")


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None and numpy scalars made plain."""
    if isinstance(obj, Mapping):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON (``allow_nan=False`` after :func:`strict`), indented."""
    return json.dumps(strict(obj), indent=2, allow_nan=False) + "\n"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    from .checkpoints import atomic_write

    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """Make sure ``path`` can be written later (its folder exists or can be made, is writable,
    and the path is not a directory); UserError naming the problem otherwise. Call it before
    any long work so a run never dies at the end."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{what} {path}: {parent} is not a directory; choose another location") from None
    except PermissionError:
        raise UserError(f"{what} {path}: cannot create {parent} (permission denied); choose a writable location") from None
    try:  # a real probe: permission bits say nothing for root or a read-only file system
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".probe-"):
            pass
    except OSError as e:
        raise UserError(f"{what} {path}: the folder {parent} is not writable ({e.strerror}); "
                        "choose a writable location") from None
    return path


def _cell(v: Any) -> str:
    return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def markdown(result: Mapping[str, Any]) -> str:
    """A defense result as a markdown report: before/after metrics, DER, time, per-round history."""
    c = result.get("run", {})
    title = (f"# {result['defense']}: {c.get('attack', '?')} (target {c.get('target', '?')}) on "
             f"{c.get('dataset', '?')}, seed {c.get('seed', '?')}")
    cols = ("clean_acc", "asr_all", "asr_nontarget", "robust_acc")
    lines = [title, "", "| | clean acc | ASR (all) | ASR (non-target) | RA |", "|---|---|---|---|---|"]
    for name in ("before", "after"):
        if result.get(name):
            lines.append(f"| {name} | " + " | ".join(_cell(result[name].get(k)) for k in cols) + " |")
    secs, comp = result.get("seconds"), result.get("compile_seconds")
    timing = "in progress" if secs is None else f"{secs:.1f} s of work, {comp:.1f} s compiling"
    lines += ["", f"DER {_cell(result.get('der'))}; {timing}."]
    if result.get("flagged_classes") is not None:
        lines.append(f"Flagged classes: {result['flagged_classes']}.")
    hist = result.get("history") or []
    if hist:
        extra = [k for k in hist[0] if k not in ("round", "seconds", *cols)]
        head = ["round", *cols, "seconds", *extra]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for h in hist:
            lines.append("| " + " | ".join(_cell(h.get(k)) for k in head) + " |")
    return "\n".join(lines) + "\n"


def save(out: str | os.PathLike, result: Mapping[str, Any]) -> None:
    """Write RESULT.json and RESULT.md beside it, each atomically."""
    out = Path(out)
    write_atomic(out, dumps(result))
    write_atomic(out.with_suffix(".md"), markdown(strict(result)))
