"""Fetching files and checking them: md5 sums and atomic, verified downloads.

:func:`_fetch_url` is the only function of the package that touches the network (tests
replace it: ``monkeypatch.setattr(ibau_jax.data.download, "_fetch_url", ...)``).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import DataError

__all__ = ["md5sum", "verify_md5", "download_file"]


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str) -> None:
    """Raise DataError if the md5 of ``path`` is not ``expected``."""
    actual = md5sum(path)
    if actual != expected.lower():
        raise DataError(
            f"checksum mismatch for {path}: expected md5 {expected}, got {actual}. "
            "The file is corrupt or incomplete; delete it and retry (it will be downloaded again)"
        )


def _fetch_url(url: str, dst: Path) -> None:
    """Stream ``url`` into ``dst`` with a progress bar. The only function that touches the network."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=60) as resp, open(dst, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"downloading {Path(url).name}") as bar:
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))


def download_file(url: str, dest: str | os.PathLike, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    The bytes go to a temporary file beside ``dest``, are checked against ``md5`` (if given),
    and only then renamed into place with ``os.replace``; an interrupted or corrupt download
    never leaves a file at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _fetch_url(url, tmp)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(
                f"could not download {url}: {e}. Download it by hand and put it at {dest}, "
                "or pass a data directory that already holds the data"
            ) from e
        if md5 is not None:
            actual = md5sum(tmp)
            if actual != md5.lower():
                raise DataError(
                    f"checksum mismatch for the download of {url}: expected md5 {md5}, got "
                    f"{actual}. The partial file was deleted; retry the download "
                    f"(or put a good copy at {dest})"
                )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest
