"""A results directory: one JSON record per finished cell, and a manifest naming the config.

    RESULTS/manifest.json           {"format", "name", "profile", "fingerprint", "config", "cells"}
    RESULTS/records/CELL_ID.json    one finished cell (written atomically, never rewritten)
    RESULTS/status.json             cells that could not run and why (e.g. an untrained zoo model)
    RESULTS/work/                   the cell in progress (its ``defend`` result and log)

A record: ``{"format", "cell", "fingerprint", "profile", "model" (the zoo entry's spec and
training record), "defense" (label, name, overrides, full config), "n_clean", "seed",
"before", "after", "der", "ra", "history", "seconds", "compile_seconds", "wall_seconds",
"diagnostics", "machine", "versions"}``.

Identity. A results directory belongs to one config name and profile; another name or profile
is refused. Within it, a record stays valid while its cell's settings are unchanged: the
model's spec (``zoo.spec_dict``: attack, target, ratio, architecture, training; not data
paths), the defense and its overrides, the clean-set size, the seed and the profile
(``cell_identity``). So a config may gain models or defenses, or change a model no finished
cell uses, and keep every finished cell; a finished cell whose settings changed is refused by
name (delete its record to rerun it), never silently mixed in. A record that does not parse
is an error naming the file and the fix.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from .. import results
from ..errors import UserError
from .config import BenchConfig
from .grid import Cell
from .zoo import spec_dict

FORMAT = 1
MANIFEST = "manifest.json"
RECORDS = "records"
STATUS = "status.json"
WORK = "work"
TIMING_KEYS = ("seconds", "compile_seconds", "wall_seconds", "machine", "versions")


class ResultsError(UserError):
    """A results directory that is not this config's, or holds a corrupt file."""


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path} is corrupt ({type(e).__name__}: {e}); {fix}") from None


def manifest(config: BenchConfig, cell_list: list[Cell]) -> dict[str, Any]:
    return {"format": FORMAT, "name": config.name, "profile": config.profile, "fingerprint": config.fingerprint,
            "source": config.source, "config": config.resolved, "cells": [c.as_dict() for c in cell_list]}


def open_results(results_dir: str | os.PathLike, config: BenchConfig,
                 all_cells: list[Cell]) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Create ``results_dir`` for ``config``, or check that it holds results of the same config
    name and profile, that every finished record of one of ``all_cells`` was made with that
    cell's present settings (``current``), and then record the present config (and the path it
    was read from) in the manifest. ResultsError naming the difference otherwise. Returns the
    directory and its finished records by cell id (read once)."""
    d = Path(results_dir)
    results.check_writable(d / MANIFEST, "--results")
    path = d / MANIFEST
    if path.exists():
        old = _read_json(path, "delete it only if the records beside it are yours to rerun, or use a new --results dir")
        if not isinstance(old, dict) or (old.get("name"), old.get("profile")) != (config.name, config.profile):
            name = old.get("name") if isinstance(old, dict) else "?"
            prof = old.get("profile") if isinstance(old, dict) else "?"
            raise ResultsError(f"{d} holds results of another config ({name!r}, profile {prof}; this is "
                               f"{config.name!r}, profile {config.profile}); "
                               "use a new --results dir or the config and --profile that wrote it")
        done = current(d, config, all_cells)
        if (old.get("fingerprint"), old.get("source")) == (config.fingerprint, config.source):
            (d / RECORDS).mkdir(exist_ok=True)
            return d, done
    else:
        done = {}
    results.write_atomic(path, results.dumps(manifest(config, all_cells)))
    (d / RECORDS).mkdir(exist_ok=True)
    return d, done


def _canonical(x: Any) -> str:
    return json.dumps(x, sort_keys=True)  # TOML and JSON values compare alike (tuples = lists)


def cell_identity(config: BenchConfig, cell: Cell) -> str:
    """What a cell's result depends on, as canonical JSON (see the module docstring)."""
    dspec = config.defense(cell.defense)
    return _canonical({"profile": config.profile, "model": spec_dict(config.model(cell.model)),
                       "defense": dspec.defense, "overrides": dspec.overrides,
                       "n_clean": cell.n_clean, "seed": cell.seed})


def record_identity(rec: dict[str, Any]) -> str:
    """``cell_identity`` as stored in a record."""
    m, dfn = rec.get("model") or {}, rec.get("defense") or {}
    return _canonical({"profile": rec.get("profile"), "model": m.get("spec"), "defense": dfn.get("name"),
                       "overrides": dfn.get("overrides"), "n_clean": rec.get("n_clean"), "seed": rec.get("seed")})


def current(results_dir: str | os.PathLike, config: BenchConfig, all_cells: list[Cell]) -> dict[str, dict[str, Any]]:
    """The finished records of ``all_cells`` by cell id, each checked to be made with the settings
    ``config`` now gives its cell: ResultsError naming every one that was not. Records of cells
    the config no longer has are left alone (and left out)."""
    ids = {c.id for c in all_cells}
    recs = {k: r for k, r in finished(results_dir).items() if k in ids}
    stale = [c.id for c in all_cells if c.id in recs and record_identity(recs[c.id]) != cell_identity(config, c)]
    if stale:
        shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        raise ResultsError(f"{len(stale)} finished cell(s) were run with other model or defense settings than "
                           f"the config now gives them: {shown}; delete those records (records/CELL.json) "
                           "to rerun them, or restore the config that made them")
    return recs


def record_path(results_dir: str | os.PathLike, cell: Cell | str) -> Path:
    return Path(results_dir) / RECORDS / f"{cell if isinstance(cell, str) else cell.id}.json"


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """One record; ResultsError naming the file and the fix when it is corrupt."""
    path = Path(path)
    fix = "delete it to rerun that cell"
    rec = _read_json(path, fix)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or rec.get("cell") != path.stem \
            or not isinstance(rec.get("after"), dict):
        raise ResultsError(f"{path} is not a complete bench record of cell {path.stem!r}; {fix}")
    return rec


def finished(results_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every record in ``results_dir`` by cell id (each one read and checked for corruption)."""
    d = Path(results_dir) / RECORDS
    if not d.is_dir():
        return {}
    return {p.stem: read_record(p) for p in sorted(d.glob("*.json"))}


def write_record(results_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write one finished cell's record atomically (refusing to replace an existing one)."""
    path = record_path(results_dir, record["cell"])
    if path.exists():
        raise ResultsError(f"{path} exists already; delete it to rerun that cell")
    results.write_atomic(path, results.dumps(record))
    return path


def read_manifest(results_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(results_dir) / MANIFEST
    if not path.exists():
        raise ResultsError(f"{results_dir} holds no {MANIFEST}; give a directory written by `ibau-jax bench`")
    m = _read_json(path, "rerun `ibau-jax bench` with the config into a new --results dir")
    if not isinstance(m, dict) or "fingerprint" not in m or not isinstance(m.get("cells"), list):
        raise ResultsError(f"{path} is not a bench manifest; rerun `ibau-jax bench` into a new --results dir")
    return m


def read_status(results_dir: str | os.PathLike) -> dict[str, str]:
    path = Path(results_dir) / STATUS
    if not path.exists():
        return {}
    s = _read_json(path, "delete it (it only lists skipped cells) and rerun")
    return s if isinstance(s, dict) else {}


def write_status(results_dir: str | os.PathLike, status: dict[str, str]) -> None:
    results.write_atomic(Path(results_dir) / STATUS, results.dumps(status))


def machine() -> dict[str, Any]:
    """Where a record was made: OS, CPU, core count, jax backend and devices."""
    import jax

    devs = jax.devices()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "jax_backend": jax.default_backend(),
            "devices": [d.device_kind for d in devs], "device_count": len(devs)}


def versions() -> dict[str, str | None]:
    """Versions of ibau-jax and the packages that decide its numbers."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("ibau-jax", "jax", "jaxlib", "flax", "optax", "jaxopt", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without what legitimately differs between two runs of a cell (times, machine)."""
    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS and not k.endswith("seconds")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(record)
