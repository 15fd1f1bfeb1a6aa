"""GTSRB (43 traffic-sign classes) as a :class:`~ibau_jax.data.dataset.Dataset`.

Read from ``test_roi32.npz`` / ``train_roi32.npz`` or from the official archives
(``Final_Training/Images/000NN/*.ppm``, ``Final_Test/Images/*.ppm`` with their ``GT-*.csv``
annotations), each image cropped to its sign's ROI and resized to 32×32.
"""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import IMAGE_SHAPE, Dataset, Split, _make_dataset, load_npz_dataset
from .errors import DataError

__all__ = ["load_gtsrb", "GTSRB_NUM_CLASSES", "GTSRB_URL"]

GTSRB_NUM_CLASSES = 43
GTSRB_TEST_NPZ = "test_roi32.npz"
GTSRB_TRAIN_NPZ = "train_roi32.npz"
GTSRB_URL = "https://benchmark.ini.rub.de/gtsrb_dataset.html"
GTSRB_TEST_CSV = "GT-final_test.csv"
_GTSRB_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_PROGRESS_MIN_FILES = 200  # no progress bar below this many image files


@dataclass(frozen=True)
class _GtsrbRow:
    path: Path          # the image file
    width: int
    height: int
    box: tuple[int, int, int, int]  # X1, Y1, X2, Y2, all inclusive
    label: int
    where: str          # "CSV, line N", for error messages


def _gtsrb_get_message(d: Path) -> str:
    return (f"get GTSRB from {GTSRB_URL}: GTSRB_Final_Training_Images.zip (train), "
            f"GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip (test), and extract them into {d}")


def _gtsrb_missing_message(d: Path, split: Split) -> str:
    if split == "test":
        layout = (f"{d / GTSRB_TEST_NPZ} (npz: x uint8 N×32×32×3 RGB, the sign ROI resized to 32×32; "
                  f"y class ids 0..42) or the official layout {d}/Final_Test/Images/*.ppm with "
                  f"{GTSRB_TEST_CSV} in {d}/Final_Test/Images/ or {d}/ (also accepted under {d}/GTSRB/)")
    else:
        layout = (f"{d / GTSRB_TRAIN_NPZ} (npz: x uint8 N×32×32×3 RGB, y class ids 0..42) or the "
                  f"official layout {d}/Final_Training/Images/000NN/*.ppm with "
                  f"{d}/Final_Training/Images/000NN/GT-000NN.csv for NN = 00..42 "
                  f"(also accepted under {d}/GTSRB/)")
    return f"GTSRB {split} data not found: expected {layout}; {_gtsrb_get_message(d)}"


def _read_gtsrb_csv(csv_path: Path, images_dir: Path) -> list[_GtsrbRow]:
    """Parse an official GTSRB annotation file (``;``-separated, header line)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            lines = list(enumerate(csv.reader(f, delimiter=";"), start=1))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: unreadable annotation file ({type(e).__name__}: {e})") from e
    if not lines:
        raise DataError(f"{csv_path}: empty file; expected the header {';'.join(_GTSRB_COLUMNS)}")
    header = [h.strip() for h in lines[0][1]]
    missing = [c for c in _GTSRB_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{csv_path}, line 1: missing column(s) {missing} in header {';'.join(header)!r}; "
                        f"expected {';'.join(_GTSRB_COLUMNS)} (the official GTSRB annotation format)")
    col = {c: header.index(c) for c in _GTSRB_COLUMNS}
    rows: list[_GtsrbRow] = []
    for lineno, fields in lines[1:]:
        if not any(s.strip() for s in fields):
            continue  # blank line
        where = f"{csv_path}, line {lineno}"
        if len(fields) < len(header):
            raise DataError(f"{where}: expected {len(header)} ';'-separated fields, got {len(fields)}")
        values = {}
        for c in _GTSRB_COLUMNS[1:]:
            raw = fields[col[c]].strip()
            try:
                values[c] = int(raw)
            except ValueError:
                raise DataError(f"{where}: {c} must be an integer, got {raw!r}") from None
        name = fields[col["Filename"]].strip()
        if not name or Path(name).name != name or name in (".", ".."):
            raise DataError(f"{where}: Filename must be a plain file name, got {name!r}")
        w, h = values["Width"], values["Height"]
        x1, y1, x2, y2 = (values[c] for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        label = values["ClassId"]
        if not 0 <= label < GTSRB_NUM_CLASSES:
            raise DataError(f"{where}: ClassId {label} is outside 0..{GTSRB_NUM_CLASSES - 1}")
        if w < 1 or h < 1:
            raise DataError(f"{where}: image size {w}x{h} must be positive")
        if not (0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h):
            raise DataError(f"{where}: ROI box ({x1}, {y1})-({x2}, {y2}) (inclusive) is outside the "
                            f"{w}x{h} image {name}; need 0 <= X1 <= X2 < Width and 0 <= Y1 <= Y2 < Height")
        rows.append(_GtsrbRow(images_dir / name, w, h, (x1, y1, x2, y2), label, where))
    if not rows:
        raise DataError(f"{csv_path}: no images listed (only a header)")
    return rows


def _read_gtsrb_images(rows: list[_GtsrbRow], desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Crop each image to its ROI box, resize to 32×32 (Pillow bilinear), RGB uint8."""
    from PIL import Image
    from tqdm.auto import tqdm

    x = np.empty((len(rows),) + IMAGE_SHAPE, np.uint8)
    for i, r in enumerate(tqdm(rows, desc=desc, unit="img", disable=len(rows) < _PROGRESS_MIN_FILES)):
        if not r.path.is_file():
            raise DataError(f"{r.where}: image file {r.path} not found")
        try:
            with Image.open(r.path) as im:
                im.load()
                if im.size != (r.width, r.height):
                    raise DataError(f"{r.where}: {r.path} is {im.size[0]}x{im.size[1]} but the csv says "
                                    f"{r.width}x{r.height}; the annotation file does not match the images")
                x1, y1, x2, y2 = r.box
                # The csv box is inclusive; Pillow's crop box excludes its right/bottom edge.
                roi = im.convert("RGB").crop((x1, y1, x2 + 1, y2 + 1))
                x[i] = np.asarray(roi.resize(IMAGE_SHAPE[1::-1], Image.Resampling.BILINEAR))
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{r.where}: cannot read image {r.path} ({type(e).__name__}: {e})") from e
    return x, np.array([r.label for r in rows], np.int32)


def _gtsrb_roots(d: Path) -> list[Path]:
    # The official zips unpack to GTSRB/Final_*; accept DIR itself or DIR/GTSRB.
    return [d, d / "GTSRB"]


def _gtsrb_test_rows(d: Path) -> list[_GtsrbRow] | None:
    for root in _gtsrb_roots(d):
        images = root / "Final_Test" / "Images"
        if not images.is_dir():
            continue
        for csv_path in (images / GTSRB_TEST_CSV, root / GTSRB_TEST_CSV, d / GTSRB_TEST_CSV):
            if csv_path.is_file():
                return _read_gtsrb_csv(csv_path, images)
        raise DataError(
            f"found {images} but no {GTSRB_TEST_CSV} in {images}/ or {d}/; it comes in "
            f"GTSRB_Final_Test_GT.zip (the GT-final_test.test.csv inside the image zip has no class ids); "
            + _gtsrb_get_message(d))
    return None


def _gtsrb_train_rows(d: Path) -> list[_GtsrbRow] | None:
    for root in _gtsrb_roots(d):
        images = root / "Final_Training" / "Images"
        if not images.is_dir():
            continue
        class_dirs = sorted(p for p in images.iterdir()
                            if p.is_dir() and len(p.name) == 5 and p.name.isdigit())
        if not class_dirs:
            raise DataError(f"{images} holds no class folders 00000..00042; " + _gtsrb_get_message(d))
        rows: list[_GtsrbRow] = []
        for cdir in class_dirs:
            cls = int(cdir.name)
            if cls >= GTSRB_NUM_CLASSES:
                raise DataError(f"{cdir}: class folder outside 00000..{GTSRB_NUM_CLASSES - 1:05d}")
            csv_path = cdir / f"GT-{cdir.name}.csv"
            if not csv_path.is_file():
                raise DataError(f"{csv_path} not found; every class folder of the official training "
                                "archive holds its GT-000NN.csv; " + _gtsrb_get_message(d))
            class_rows = _read_gtsrb_csv(csv_path, cdir)
            for r in class_rows:
                if r.label != cls:
                    raise DataError(f"{r.where}: ClassId {r.label} does not match the folder {cdir.name}")
            rows += class_rows
        if len(class_dirs) < GTSRB_NUM_CLASSES:
            warnings.warn(f"{images}: only {len(class_dirs)} of {GTSRB_NUM_CLASSES} class folders present; "
                          "the training set is incomplete", stacklevel=3)
        return rows
    return None


def load_gtsrb(data_dir: str | os.PathLike, split: Split = "test") -> Dataset:
    """Load a GTSRB split as a Dataset: x uint8 (N, 32, 32, 3) RGB NHWC, y int32 in [0, 43).

    Tried in order:

    1. ``DIR/test_roi32.npz`` (``split='test'``) or ``DIR/train_roi32.npz`` (``'train'``):
       x uint8 N×32×32×3 (sign ROI already resized), y class ids;
    2. the official archive layout, in ``DIR`` or ``DIR/GTSRB`` (as the zips unpack):
       train ``Final_Training/Images/000NN/*.ppm`` with ``000NN/GT-000NN.csv``
       (NN = 00..42, classes in folder order, rows in csv order); test
       ``Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` (from GTSRB_Final_Test_GT.zip)
       in ``Final_Test/Images/`` or ``DIR/``, rows in csv order.

    Archive images are cropped to their ROI box, whose corners ``(Roi.X1, Roi.Y1)`` and
    ``(Roi.X2, Roi.Y2)`` are both inclusive (Pillow crop box ``(X1, Y1, X2 + 1, Y2 + 1)``),
    then resized to 32×32 with Pillow's bilinear filter (which antialiases when shrinking)
    and converted to RGB. A malformed csv, a missing or unreadable image, a ROI outside its
    image or a class id outside 0..42 raises DataError naming the file and line. A progress
    bar is shown from 200 images on. Get the data from https://benchmark.ini.rub.de/gtsrb_dataset.html.
    """
    if split not in ("test", "train"):
        raise DataError(f"split must be 'test' or 'train', got {split!r}")
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise DataError(f"GTSRB data directory {d} does not exist; " + _gtsrb_missing_message(d, split))
    name = f"gtsrb-{split}"
    npz = d / (GTSRB_TEST_NPZ if split == "test" else GTSRB_TRAIN_NPZ)
    if npz.is_file():
        return load_npz_dataset(npz, GTSRB_NUM_CLASSES, name)
    rows = _gtsrb_test_rows(d) if split == "test" else _gtsrb_train_rows(d)
    if rows is None:
        raise DataError(_gtsrb_missing_message(d, split))
    x, y = _read_gtsrb_images(rows, f"reading GTSRB {split}")
    return _make_dataset(x, y, GTSRB_NUM_CLASSES, name, str(d))
