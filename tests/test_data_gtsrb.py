"""Tests for ibau_jax.data.gtsrb: the shared npz, a fake official archive, malformed csv and images."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibau_jax import data
from ibau_jax.data import DataError
import ibau_jax.data.gtsrb as data_gtsrb
from conftest import shared_path


def test_real_gtsrb():
    g = data.load_gtsrb(shared_path("datasets/gtsrb/test_roi32.npz").parent)
    assert g.x.shape == (12630, 32, 32, 3) and g.x.dtype == np.uint8
    assert g.num_classes == 43 and g.y.dtype == np.int32 and g.y.max() == 42


def test_gtsrb_missing(tmp_path):
    with pytest.raises(DataError, match=r"expected .*test_roi32\.npz"):
        data.load_gtsrb(tmp_path)


# --------------------------------------------------------------------------- GTSRB archive

def _gtsrb_image(w: int, h: int, seed: int) -> np.ndarray:
    """Random pixels: any off-by-one in the crop or a different filter changes the result."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _expected_roi32(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    roi = Image.fromarray(img).crop((x1, y1, x2 + 1, y2 + 1))
    return np.asarray(roi.resize((32, 32), Image.Resampling.BILINEAR))


_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _write_gtsrb_rows(images_dir: Path, csv_path: Path, rows: list[tuple[str, int, int, tuple, int]],
                      seed: int) -> list[np.ndarray]:
    """Write .ppm images and their csv; return the expected 32×32 crops in csv order."""
    images_dir.mkdir(parents=True, exist_ok=True)
    lines, expected = [_HEADER], []
    for i, (name, w, h, box, cls) in enumerate(rows):
        img = _gtsrb_image(w, h, seed + i)
        Image.fromarray(img).save(images_dir / name)
        lines.append(f"{name};{w};{h};{box[0]};{box[1]};{box[2]};{box[3]};{cls}")
        expected.append(_expected_roi32(img, box))
    csv_path.write_text("\r\n".join(lines) + "\r\n")  # the official files use CRLF
    return expected


_TRAIN_CLASSES = {  # class id -> rows (file name, width, height, inclusive ROI box)
    0: [("00000_00000.ppm", 40, 37, (5, 6, 34, 30)), ("00000_00001.ppm", 31, 33, (0, 0, 30, 32))],
    2: [("00000_00000.ppm", 45, 41, (3, 4, 40, 38))],
    42: [("00001_00000.ppm", 29, 35, (2, 5, 25, 30)), ("00001_00001.ppm", 52, 48, (7, 3, 47, 44))],
}
_TEST_ROWS = [  # csv order deliberately not the file-name order
    ("00002.ppm", 40, 37, (5, 6, 34, 30), 16),
    ("00000.ppm", 53, 54, (6, 5, 48, 49), 1),
    ("00001.ppm", 42, 45, (5, 5, 36, 40), 42),
]


@pytest.fixture
def gtsrb_archive(tmp_path):
    root = tmp_path / "gtsrb"
    train_expected, train_labels = [], []
    for cls, rows in _TRAIN_CLASSES.items():
        cdir = root / "Final_Training" / "Images" / f"{cls:05d}"
        train_expected += _write_gtsrb_rows(cdir, cdir / f"GT-{cls:05d}.csv",
                                            [(n, w, h, b, cls) for n, w, h, b in rows], seed=100 * cls)
        train_labels += [cls] * len(rows)
    test_dir = root / "Final_Test" / "Images"
    test_expected = _write_gtsrb_rows(test_dir, test_dir / "GT-final_test.csv", _TEST_ROWS, seed=7)
    return {"root": root, "train_x": np.stack(train_expected), "train_y": train_labels,
            "test_x": np.stack(test_expected), "test_y": [r[4] for r in _TEST_ROWS]}


def test_gtsrb_archive_train(gtsrb_archive):
    with pytest.warns(UserWarning, match="only 3 of 43 class folders"):
        g = data.load_gtsrb(gtsrb_archive["root"], split="train")
    assert g.name == "gtsrb-train" and g.num_classes == 43
    assert g.x.shape == (5, 32, 32, 3) and g.x.dtype == np.uint8 and g.y.dtype == np.int32
    assert g.y.tolist() == gtsrb_archive["train_y"] == [0, 0, 2, 42, 42]
    assert np.array_equal(g.x, gtsrb_archive["train_x"])


def test_gtsrb_archive_test_order_and_crop(gtsrb_archive):
    g = data.load_gtsrb(gtsrb_archive["root"])  # split='test' is the default
    assert g.name == "gtsrb-test" and g.x.shape == (3, 32, 32, 3)
    assert g.y.tolist() == [16, 1, 42]  # csv order, not file-name order
    assert np.array_equal(g.x, gtsrb_archive["test_x"])


def test_gtsrb_roi_is_inclusive(tmp_path):
    """Independent of PIL: solid ROI colours show which pixels the crop keeps."""
    w, h, (x1, y1, x2, y2) = 40, 37, (5, 6, 34, 30)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :] = (0, 255, 0)                          # outside the box: green
    img[y1:y2 + 1, x1:x2 + 1] = (255, 0, 0)          # the inclusive box: red ...
    img[y1:y2 + 1, x2] = (0, 0, 255)                 # ... with its last column (X2) blue
    images = tmp_path / "Final_Test" / "Images"
    images.mkdir(parents=True)
    Image.fromarray(img).save(images / "00000.ppm")
    (images / "GT-final_test.csv").write_text(f"{_HEADER}\n00000.ppm;{w};{h};{x1};{y1};{x2};{y2};3\n")
    x = data.load_gtsrb(tmp_path).x[0].astype(int)
    assert (x[..., 1] == 0).all()                    # no green: nothing outside the box
    assert (x[:, 0] == (255, 0, 0)).all()            # left edge: pure red
    assert x[:, -1, 2].min() > 100                   # right edge: column X2 (blue) was kept
    assert x.shape == (32, 32, 3)


def test_gtsrb_gtsrb_subfolder_and_csv_in_root(gtsrb_archive, tmp_path):
    # As the official zips unpack: DIR/GTSRB/Final_Test/Images/*.ppm and DIR/GT-final_test.csv.
    d = tmp_path / "unzipped"
    shutil.copytree(gtsrb_archive["root"] / "Final_Test", d / "GTSRB" / "Final_Test")
    (d / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv").rename(d / "GT-final_test.csv")
    g = data.load_gtsrb(d)
    assert np.array_equal(g.x, gtsrb_archive["test_x"]) and g.y.tolist() == [16, 1, 42]


def test_gtsrb_npz_preferred_over_archive(gtsrb_archive):
    root = gtsrb_archive["root"]
    x = np.full((2, 32, 32, 3), 7, np.uint8)
    np.savez(root / "test_roi32.npz", x=x, y=np.array([4, 5]))
    np.savez(root / "train_roi32.npz", x=x[:1], y=np.array([6]))
    assert data.load_gtsrb(root).y.tolist() == [4, 5]
    t = data.load_gtsrb(root, split="train")
    assert t.y.tolist() == [6] and t.name == "gtsrb-train"


def test_real_gtsrb_npz_matches_official_csv():
    npz = shared_path("datasets/gtsrb/test_roi32.npz")
    csv_path = shared_path("datasets/gtsrb/GT-final_test.csv")
    g = data.load_gtsrb(npz.parent, split="test")
    rows = data_gtsrb._read_gtsrb_csv(csv_path, npz.parent)  # the real annotation file parses cleanly
    assert len(rows) == len(g) == 12630
    assert [r.label for r in rows] == g.y.tolist()
    assert rows[0].path.name == "00000.ppm" and rows[0].box == (6, 5, 48, 49) and rows[0].label == 16


def test_gtsrb_progress_bar(gtsrb_archive, monkeypatch, capsys):
    data.load_gtsrb(gtsrb_archive["root"])
    assert "reading GTSRB" not in capsys.readouterr().err  # 3 files < 200: no bar
    monkeypatch.setattr(data_gtsrb, "_PROGRESS_MIN_FILES", 1)
    data.load_gtsrb(gtsrb_archive["root"])
    assert "reading GTSRB test" in capsys.readouterr().err


def _test_csv(root: Path) -> Path:
    return root / "Final_Test" / "Images" / "GT-final_test.csv"


@pytest.mark.parametrize("edit, pattern", [
    (lambda t: t.replace("ClassId", "Class"), r"GT-final_test\.csv, line 1: missing column\(s\) \['ClassId'\]"),
    (lambda t: t.replace("00000.ppm;53;54;6;", "00000.ppm;53;5x4;6;"),
     r"GT-final_test\.csv, line 3: Height must be an integer, got '5x4'"),
    (lambda t: t.replace("00001.ppm;42;45;5;5;36;40;42", "00001.ppm;42;45"),
     r"GT-final_test\.csv, line 4: expected 8 ';'-separated fields, got 3"),
    (lambda t: t.replace(";36;40;42", ";36;40;43"), r"GT-final_test\.csv, line 4: ClassId 43 is outside 0\.\.42"),
    (lambda t: t.replace(";36;40;42", ";36;40;-1"), r"line 4: ClassId -1 is outside 0\.\.42"),
    (lambda t: t.replace("5;5;36;40", "5;5;42;40"), r"line 4: ROI box \(5, 5\)-\(42, 40\) \(inclusive\) is outside the 42x45 image"),
    (lambda t: t.replace("5;6;34;30", "34;6;5;30"), r"line 2: ROI box .* is outside"),
    (lambda t: t.replace("00002.ppm", "missing.ppm"), r"line 2: image file .*missing\.ppm not found"),
    (lambda t: t.replace("00002.ppm", "../00002.ppm"), r"line 2: Filename must be a plain file name"),
    (lambda t: t.replace("00000.ppm;53;54", "00000.ppm;54;54"), r"line 3: .*00000\.ppm is 53x54 but the csv says 54x54"),
    (lambda t: t.splitlines()[0], r"GT-final_test\.csv: no images listed"),
    (lambda t: "", r"GT-final_test\.csv: empty file"),
])
def test_gtsrb_bad_csv(gtsrb_archive, edit, pattern):
    p = _test_csv(gtsrb_archive["root"])
    p.write_text(edit(p.read_text()))
    with pytest.raises(DataError, match=pattern):
        data.load_gtsrb(gtsrb_archive["root"])


def test_gtsrb_corrupt_image(gtsrb_archive):
    (gtsrb_archive["root"] / "Final_Test" / "Images" / "00000.ppm").write_bytes(b"P6\n53 54\n255\n\x00\x01")
    with pytest.raises(DataError, match=r"GT-final_test\.csv, line 3: cannot read image .*00000\.ppm"):
        data.load_gtsrb(gtsrb_archive["root"])


def test_gtsrb_train_errors(gtsrb_archive):
    images = gtsrb_archive["root"] / "Final_Training" / "Images"
    p = images / "00002" / "GT-00002.csv"
    p.write_text(p.read_text().replace(";38;2", ";38;5"))
    with pytest.raises(DataError, match=r"GT-00002\.csv, line 2: ClassId 5 does not match the folder 00002"):
        data.load_gtsrb(gtsrb_archive["root"], split="train")
    p.unlink()
    with pytest.raises(DataError, match=r"GT-00002\.csv not found.*GTSRB_Final_Training_Images\.zip"):
        data.load_gtsrb(gtsrb_archive["root"], split="train")
    shutil.rmtree(images / "00002")
    (images / "00043").mkdir()
    with pytest.raises(DataError, match=r"00043: class folder outside 00000\.\.00042"):
        data.load_gtsrb(gtsrb_archive["root"], split="train")


def test_gtsrb_test_images_without_gt_csv(gtsrb_archive):
    _test_csv(gtsrb_archive["root"]).unlink()
    with pytest.raises(DataError, match=r"no GT-final_test\.csv .*GTSRB_Final_Test_GT\.zip"):
        data.load_gtsrb(gtsrb_archive["root"])


def test_gtsrb_nothing_there(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_gtsrb(tmp_path, split="train")
    msg = str(e.value)
    for part in ("train_roi32.npz", "Final_Training/Images/000NN/*.ppm", "GT-000NN.csv",
                 "https://benchmark.ini.rub.de/gtsrb_dataset.html", "GTSRB_Final_Training_Images.zip",
                 "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip", f"extract them into {tmp_path}"):
        assert part in msg, part
    with pytest.raises(DataError, match=r"test_roi32\.npz.*Final_Test/Images/\*\.ppm.*GT-final_test\.csv"):
        data.load_gtsrb(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data.load_gtsrb(tmp_path / "nope")
    with pytest.raises(DataError, match="split must be"):
        data.load_gtsrb(tmp_path, split="val")
