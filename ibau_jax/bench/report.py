"""Tables and plots of a bench results directory, from its manifest and records alone.

``ibau-jax report RESULTS [--reference CSV ...] [--out DIR]`` writes into ``RESULTS/report/``:

* ``report.md``: per clean-set size, the paper's layout (rows: models/attacks; columns: no
  defense, then each defense; cells ``ACC / ASR (RA)`` in percent, mean over seeds); the
  runtime table (mean seconds per defense at the largest clean-set size, compile time apart,
  and the ratio of the fastest of the paper's baselines' time to I-BAU's); the missing cells and why;
* ``report.json``: the same numbers (fractions, not percent);
* ``clean_size_MODEL.png`` when the config has several clean-set sizes: ASR and accuracy
  against the size, one line per defense.

A reference CSV (``model,defense,clean_acc,asr[,ra][,n_clean][,source]``; values as fractions
or percent) adds a column ``DEFENSE [SOURCE]`` beside each of our defense columns it names
(``defense`` = ``none`` for the poisoned model).
"""
from __future__ import annotations

import csv
import os
import statistics
from pathlib import Path
from typing import Any

from .. import results
from ..errors import UserError
from . import records

METRICS = ("clean_acc", "asr_all", "asr_nontarget", "robust_acc")
# The defenses the I-BAU paper times I-BAU against ("more than 13x faster than the fastest"):
# ``ft`` is the floor every defense must beat, ANP and SAU came after the paper.
PAPER_BASELINES = ("nc", "tabor", "deepinspect", "fp", "nad")


class ReferenceError(UserError):
    """A reference CSV that cannot be read."""


def runtime_ratio(runtime: dict[str, dict[str, Any]], recs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest of the paper's baselines (:data:`PAPER_BASELINES`) present against the fastest
    I-BAU column: its whole run and, where the records hold per-round times, its first round."""
    ibau = {k: v["seconds"] for k, v in runtime.items() if v["defense"] == "ibau" and v["seconds"]}
    base = {k: v["seconds"] for k, v in runtime.items() if v["defense"] in PAPER_BASELINES and v["seconds"]}
    if not ibau or not base:
        return None
    fastest, ib = min(base, key=base.get), min(ibau, key=ibau.get)
    first = _mean([r["history"][0].get("seconds") for r in recs
                   if r["defense"]["label"] == ib and r.get("history")])
    return {"fastest_baseline": fastest, "baseline_seconds": base[fastest], "ibau": ib, "ibau_seconds": ibau[ib],
            "ratio": base[fastest] / ibau[ib], "ibau_round_seconds": first,
            "ratio_to_round": base[fastest] / first if first else None}


def _mean(vals: list[float | None]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _cell_text(m: dict[str, Any] | None) -> str:
    if not m:
        return "missing"
    ra = m.get("robust_acc")
    return f"{_pct(m.get('clean_acc'))} / {_pct(m.get('asr_all'))}" + ("" if ra is None else f" ({_pct(ra)})")


def read_reference(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a reference CSV as ``{"model", "defense", "n_clean", "source", "clean_acc", "asr_all",
    "robust_acc"}`` (fractions); ReferenceError naming the file and the fix otherwise."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReferenceError(f"--reference {path} cannot be read ({e}); give a CSV file") from None
    need = {"model", "defense", "clean_acc", "asr"}
    if not rows or not need <= set(rows[0]):
        raise ReferenceError(f"--reference {path}: needs a header with {', '.join(sorted(need))} "
                             "(optional: ra, n_clean, source) and at least one row")
    out = []
    for i, r in enumerate(rows, start=2):
        def num(key: str) -> float | None:
            v = (r.get(key) or "").strip().rstrip("%")
            if not v:
                return None
            try:
                x = float(v)
            except ValueError:
                raise ReferenceError(f"--reference {path} line {i}: {key}={v!r} is not a number") from None
            return x / 100 if x > 1 else x
        n = (r.get("n_clean") or "").strip()
        out.append({"model": r["model"].strip(), "defense": r["defense"].strip(), "n_clean": int(n) if n else None,
                    "source": (r.get("source") or "").strip() or path.stem, "clean_acc": num("clean_acc"),
                    "asr_all": num("asr"), "robust_acc": num("ra")})
    return out


def summarize(manifest: dict[str, Any], recs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's numbers: per n_clean, per model, per defense label: mean metrics over seeds."""
    cells = manifest["cells"]
    models = list(dict.fromkeys(c["model"] for c in cells))
    defs = list(dict.fromkeys(c["defense"] for c in cells))
    sizes = sorted({c["n_clean"] for c in cells})
    tables: dict[str, Any] = {}
    for n in sizes:
        t: dict[str, Any] = {}
        for m in models:
            row: dict[str, Any] = {}
            mine = [r for r in recs.values() if r["model"]["name"] == m and r["n_clean"] == n]
            if mine:
                row["none"] = {k: _mean([r["before"].get(k) for r in mine]) for k in METRICS}
            for dl in defs:
                rs = [r for r in mine if r["defense"]["label"] == dl]
                if rs:
                    row[dl] = {**{k: _mean([r["after"].get(k) for r in rs]) for k in METRICS},
                               "der": _mean([r.get("der") for r in rs]), "seeds": len(rs),
                               "seconds": _mean([r.get("seconds") for r in rs]),
                               "compile_seconds": _mean([r.get("compile_seconds") for r in rs])}
            t[m] = row
        tables[str(n)] = t
    # runtime: the single-target setting = the largest clean set
    top = [r for r in recs.values() if r["n_clean"] == sizes[-1]] if sizes else []
    runtime: dict[str, Any] = {}
    for dl in defs:
        rs = [r for r in top if r["defense"]["label"] == dl]
        if rs:
            runtime[dl] = {"defense": rs[0]["defense"]["name"], "seconds": _mean([r.get("seconds") for r in rs]),
                           "compile_seconds": _mean([r.get("compile_seconds") for r in rs]), "cells": len(rs)}
    ratio = runtime_ratio(runtime, top)
    status = manifest.get("_status", {})
    missing = {c["id"]: status.get(c["id"], "not run yet (rerun `ibau-jax bench` with the same config)")
               for c in cells if c["id"] not in recs}
    profiles = sorted({r["profile"] for r in recs.values()}) or [manifest.get("profile")]
    return {"name": manifest.get("name"), "profile": manifest.get("profile"), "record_profiles": profiles,
            "fingerprint": manifest.get("fingerprint"), "source": manifest.get("source"), "models": models,
            "defenses": defs, "n_clean": sizes, "tables": tables, "runtime": runtime, "runtime_ratio": ratio,
            "cells": len(cells), "finished": len(recs), "missing": missing}


def _ref_lookup(refs: list[dict[str, Any]], model: str, defense: str, n: int, source: str) -> dict | None:
    for r in refs:
        if r["model"] == model and r["defense"] == defense and r["source"] == source \
                and (r["n_clean"] is None or r["n_clean"] == n):
            return r
    return None


def _ref_text(r: dict[str, Any] | None) -> str:
    return "–" if r is None else _cell_text(r)


def markdown(s: dict[str, Any], refs: list[dict[str, Any]] | None = None) -> str:
    refs = refs or []
    sources = list(dict.fromkeys(r["source"] for r in refs))
    cmd = f"ibau-jax bench {s['source']} --profile {s['profile']}"
    lines = [f"# {s['name']}: profile `{s['profile']}`", "",
             f"Command: `{cmd}`; config fingerprint `{s['fingerprint']}`. {s['finished']} of {s['cells']} "
             "cells finished. Cells: clean accuracy / ASR (robust accuracy), percent, mean over seeds.", ""]
    for n in s["n_clean"]:
        t = s["tables"][str(n)]
        cols: list[tuple[str, str | None]] = []
        for dl in ["none", *s["defenses"]]:
            cols.append((dl, None))
            cols += [(dl, src) for src in sources if any(r["defense"] == dl for r in refs if r["source"] == src)]
        head = [("no defense" if dl == "none" else dl) + (f" [{src}]" if src else "") for dl, src in cols]
        lines += [f"## {n} clean images (profile `{s['profile']}`)", "",
                  "| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for m in s["models"]:
            row = t.get(m, {})
            # a reference the CSV does not give is '–'; 'missing' is kept for our cells not yet run
            vals = [_cell_text(row.get(dl)) if src is None else _ref_text(_ref_lookup(refs, m, dl, n, src))
                    for dl, src in cols]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines.append("")
    for n in s["n_clean"]:
        for m in s["models"]:
            row = s["tables"][str(n)].get(m, {})
            if not any(dl in row for dl in s["defenses"]):
                continue
            lines += [f"### {m}, {n} clean images: every metric", "",
                      "| defense | clean acc | ASR (all) | ASR (non-target) | RA | DER | seconds | compile s | seeds |",
                      "|---|---|---|---|---|---|---|---|---|"]
            f4 = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
            if "none" in row:
                b = row["none"]
                lines.append(f"| no defense | {f4(b['clean_acc'])} | {f4(b['asr_all'])} | {f4(b['asr_nontarget'])} "
                             f"| {f4(b['robust_acc'])} | – | – | – | – |")
            for dl in s["defenses"]:
                v = row.get(dl)
                if v:
                    lines.append(f"| {dl} | {f4(v['clean_acc'])} | {f4(v['asr_all'])} | {f4(v['asr_nontarget'])} "
                                 f"| {f4(v['robust_acc'])} | {f4(v['der'])} | {v['seconds']:.1f} "
                                 f"| {v['compile_seconds'] or 0:.1f} | {v['seeds']} |")
            lines.append("")
    if s["runtime"]:
        lines += [f"## Runtime ({s['n_clean'][-1]} clean images, profile `{s['profile']}`)", "",
                  "| defense | seconds (mean) | compile seconds | cells |", "|---|---|---|---|"]
        for dl, v in s["runtime"].items():
            lines.append(f"| {dl} | {v['seconds']:.1f} | {v['compile_seconds'] or 0:.1f} | {v['cells']} |")
        r = s["runtime_ratio"]
        if r:
            text = (f"Fastest of the paper's baselines ({r['fastest_baseline']}, {r['baseline_seconds']:.1f} s) / "
                    f"I-BAU ({r['ibau']}, {r['ibau_seconds']:.1f} s) = {r['ratio']:.2f}x")
            if r["ratio_to_round"] is not None:
                text += (f"; / I-BAU's first round ({r['ibau_round_seconds']:.1f} s) = "
                         f"{r['ratio_to_round']:.2f}x")
            text += f". (Baselines: {', '.join(PAPER_BASELINES)}; the paper reports more than 13x.)"
        else:
            text = ("Ratio of the fastest baseline to I-BAU: needs an I-BAU cell and a cell of one of the "
                    f"paper's baselines ({', '.join(PAPER_BASELINES)}).")
        lines += ["", text, ""]
    if s["missing"]:
        lines += ["## Missing cells", ""] + [f"- `{k}`: {v}" for k, v in s["missing"].items()] + [""]
    return "\n".join(lines)


def plot_clean_size(s: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per model: ASR and clean accuracy against the clean-set size, a line per defense."""
    if len(s["n_clean"]) < 2:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for m in s["models"]:
        lines = {dl: [(n, s["tables"][str(n)].get(m, {}).get(dl)) for n in s["n_clean"]] for dl in s["defenses"]}
        lines = {dl: [(n, v) for n, v in pts if v] for dl, pts in lines.items()}
        lines = {dl: pts for dl, pts in lines.items() if pts}   # a defense with no finished cell has no legend entry
        if not any(lines.values()):
            continue  # no finished cell of this model yet
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for dl, pts in lines.items():
            for ax, key in zip(axes, ("asr_all", "clean_acc")):
                ax.plot([n for n, _ in pts], [v[key] for _, v in pts], "o-", label=dl)
        for ax, title in zip(axes, ("attack success rate", "clean accuracy")):
            ax.set_xscale("log")
            ax.set_xlabel("clean images")
            ax.set_title(title)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{m} ({s['name']}, profile {s['profile']})")
        fig.tight_layout()
        p = out / f"clean_size_{m}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def current_records(results_dir: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The records of the manifest's cells, each checked against the settings the manifest's
    config gives its cell (``records.current``); records of other cells are ignored."""
    from . import config, grid

    cfg = config.parse(manifest["config"], profile=manifest.get("profile", "full"),
                       source=str(Path(results_dir) / records.MANIFEST))
    return records.current(results_dir, cfg, grid.cells(cfg))


def write(results_dir: str | os.PathLike, *, out: str | os.PathLike | None = None,
          references: list[str] | None = None) -> list[Path]:
    """Write report.md, report.json and the plots for ``results_dir``; the paths written."""
    d = Path(results_dir)
    manifest = records.read_manifest(d)
    refs = [r for p in references or [] for r in read_reference(p)]
    recs = current_records(d, manifest)
    manifest = {**manifest, "_status": records.read_status(d)}
    s = summarize(manifest, recs)
    out = Path(out) if out else d / "report"
    results.check_writable(out / "report.md", "--out")
    md = markdown(s, refs)
    pngs = plot_clean_size(s, out)
    if pngs:
        md += "\n## Clean-set size\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    results.write_atomic(out / "report.md", md)
    results.write_atomic(out / "report.json", results.dumps({**s, "references": refs}))
    return [out / "report.md", out / "report.json", *pngs]
