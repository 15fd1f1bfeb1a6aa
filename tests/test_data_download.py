"""Tests for ibau_jax.data.download: md5 sums and atomic, verified downloads (no network)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ibau_jax import data
from ibau_jax.data import DataError
import ibau_jax.data.download as data_download


pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_md5sum_matches_hashlib(tmp_path):
    p = tmp_path / "f.bin"
    payload = bytes(range(256)) * 1000  # spans several chunks of the small chunk size below
    p.write_bytes(payload)
    assert data.md5sum(p, chunk_size=4096) == hashlib.md5(payload).hexdigest()
    assert data.md5sum(p) == hashlib.md5(payload).hexdigest()


def test_verify_md5(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    data.verify_md5(p, hashlib.md5(b"hello").hexdigest())
    with pytest.raises(DataError, match=r"checksum mismatch for .*f\.bin.*delete it and retry"):
        data.verify_md5(p, data.CIFAR10_MD5)


def test_download_file_lands_atomically(tmp_path, monkeypatch):
    dest = tmp_path / "sub" / "file.bin"
    payload = b"payload"
    seen = []

    def fake_fetch(url, dst):
        # Written to a temp file beside the destination, never the destination itself.
        seen.append(Path(dst))
        assert Path(dst).parent == dest.parent and Path(dst) != dest and not dest.exists()
        Path(dst).write_bytes(payload)

    monkeypatch.setattr(data_download, "_fetch_url", fake_fetch)
    assert data.download_file("https://example.invalid/file.bin", dest,
                              md5=hashlib.md5(payload).hexdigest().upper()) == dest
    assert dest.read_bytes() == payload and len(seen) == 1
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]  # no temp left


def test_download_file_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_download, "_fetch_url", lambda url, dst: Path(dst).write_bytes(b"bad"))
    with pytest.raises(DataError, match=r"checksum mismatch for the download of .*retry the download"):
        data.download_file("https://example.invalid/f", tmp_path / "f", md5=hashlib.md5(b"good").hexdigest())
    assert list(tmp_path.iterdir()) == []


def test_download_file_interrupted_leaves_nothing(tmp_path, monkeypatch):
    def broken_fetch(url, dst):
        Path(dst).write_bytes(b"partial")
        raise TimeoutError("timed out")

    monkeypatch.setattr(data_download, "_fetch_url", broken_fetch)
    with pytest.raises(DataError, match=r"could not download .*timed out.*Download it by hand"):
        data.download_file("https://example.invalid/f", tmp_path / "f")
    assert list(tmp_path.iterdir()) == []
