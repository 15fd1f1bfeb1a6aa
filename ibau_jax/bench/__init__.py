"""``ibau-jax bench`` / ``report``: the paper's evaluation as one resumable grid of defense runs.

Modules: ``config`` (TOML configs, validated), ``grid`` (cells and their ids), ``zoo``
(poisoned models: imported or trained), ``records`` (the results directory: manifest, one
record per cell), ``runner`` (runs the cells), ``report`` (tables and plots from records).
See docs/evaluation.md.
"""
