"""Tests for ibau_jax.data.paths: the shared data folder and the download cache."""
from __future__ import annotations

from pathlib import Path

from ibau_jax import data


def test_default_shared_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IBAU_SHARED", str(tmp_path))
    assert data.default_shared_dir() == tmp_path
    monkeypatch.delenv("IBAU_SHARED")
    monkeypatch.chdir(tmp_path)
    assert data.default_shared_dir() == tmp_path.parent / "shared"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IBAU_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("IBAU_CACHE", "~/elsewhere")
    assert data.default_cache_dir() == Path.home() / "elsewhere"
    monkeypatch.delenv("IBAU_CACHE")
    assert data.default_cache_dir() == Path.home() / ".cache" / "ibau_jax"
