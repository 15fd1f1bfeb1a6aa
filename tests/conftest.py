"""Shared test helpers: where ../shared is, and how its absence is treated.

Tests that need the shared data call ``shared_path(rel)``: it returns the path, or fails
(CI=true) / skips (elsewhere) when the file is absent, so CI can never pass by skipping.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CKPT = "ibau-original/checkpoints/badnets_8_02_ckpt.pth"
CIFAR_DIR = "datasets/cifar10"
TRIGGERS = "ibau-original/triggers"


def shared_root() -> Path:
    return Path(os.environ.get("IBAU_SHARED", REPO_ROOT.parent / "shared"))


def shared_path(rel: str) -> Path:
    path = shared_root() / rel
    if not path.exists():
        msg = f"shared data {path} not found (set IBAU_SHARED to the folder holding the shared data)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
