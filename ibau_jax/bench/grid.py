"""The grid of a benchmark: cells = model × defense × clean-set size × seed, with stable ids.

A cell's id, ``{model}__{defense}__n{n_clean}__s{seed}``, names its record file; it depends
only on those four values, so adding a model or a defense to a config never renames the
cells already run.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .config import BenchConfig


@dataclasses.dataclass(frozen=True)
class Cell:
    """One defense run: defense ``defense`` (a label of the config) on zoo model ``model``."""

    model: str
    defense: str
    n_clean: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}__{self.defense}__n{self.n_clean}__s{self.seed}"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **dataclasses.asdict(self)}


def cells(config: BenchConfig, selected: bool = False) -> list[Cell]:
    """Every cell of ``config``, models outermost (so one model's data stays loaded), then the
    clean-set size, defense and seed, in the config's order; with ``selected`` only those of
    ``config.only_models`` / ``only_defenses`` (when set)."""
    om, od = (config.only_models, config.only_defenses) if selected else (None, None)
    return [Cell(m.name, d.label, n, s) for m in config.models if not om or m.name in om
            for n in config.n_clean for d in config.defenses if not od or d.label in od for s in config.seeds]
