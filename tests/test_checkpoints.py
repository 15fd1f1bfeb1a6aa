"""Tests for ibau_jax.checkpoints: torch import (safe unpickling), own .npz format, errors."""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from ibau_jax.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_model,
    load_torch_checkpoint,
    save_checkpoint,
)
from ibau_jax.models import get_model, init_variables
from conftest import shared_path

REPO_ROOT = Path(__file__).resolve().parents[1]
CKPT_REL = "ibau-original/checkpoints/badnets_8_02_ckpt.pth"
CONVS = (0, 3, 8, 11, 16, 19)


shared_file = shared_path  # fails under CI=true, skips elsewhere, when absent


def torch_small_vgg(num_classes: int = 10, widths=(32, 64, 128)):
    """The authors' PyTorch small VGG: features indices as in their state_dict."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    layers, cin = [], 3
    for width, rate in zip(widths, (0.3, 0.4, 0.4)):
        for _ in range(2):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ELU()]
            cin = width
        layers += [nn.MaxPool2d(2), nn.Dropout(rate)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(cin * 16, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    return Net()


def expected_torch_key_map() -> dict[tuple[str, ...], tuple[str, tuple[int, ...] | None]]:
    """flax path -> (torch key, transpose applied to the torch tensor)."""
    m: dict[tuple[str, ...], tuple[str, tuple[int, ...] | None]] = {}
    for i, c in enumerate(CONVS):
        m[("params", f"conv{i}", "kernel")] = (f"features.{c}.weight", (2, 3, 1, 0))
        m[("params", f"conv{i}", "bias")] = (f"features.{c}.bias", None)
        m[("params", f"bn{i}", "scale")] = (f"features.{c + 1}.weight", None)
        m[("params", f"bn{i}", "bias")] = (f"features.{c + 1}.bias", None)
        m[("batch_stats", f"bn{i}", "mean")] = (f"features.{c + 1}.running_mean", None)
        m[("batch_stats", f"bn{i}", "var")] = (f"features.{c + 1}.running_var", None)
    m[("params", "classifier", "kernel")] = ("classifier.weight", (1, 0))
    m[("params", "classifier", "bias")] = ("classifier.bias", None)
    return m


def flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


# ---------------------------------------------------------------- real checkpoint


def test_real_checkpoint_matches_torch_load():
    torch = pytest.importorskip("torch")
    path = shared_file(CKPT_REL)
    variables, meta = load_torch_checkpoint(path)
    assert meta["acc"] == pytest.approx(84.46) and meta["epoch"] == 48
    assert meta["model"] == "small_vgg" and meta["num_classes"] == 10

    template = flat(init_variables(get_model("small_vgg", 10)))
    got = flat(variables)
    assert set(got) == set(template)
    for p, leaf in got.items():
        assert leaf.shape == template[p].shape and leaf.dtype == np.float32, p

    ref = torch.load(path, map_location="cpu", weights_only=True)["net"]
    key_map = expected_torch_key_map()
    assert {k for k in ref if not k.endswith("num_batches_tracked")} == {k for k, _ in key_map.values()}
    for p, (key, perm) in key_map.items():
        want = ref[key].numpy()
        if perm is not None:
            want = want.transpose(perm)
        np.testing.assert_array_equal(got[p], want, err_msg=key)


def test_real_checkpoint_logits_match_torch():
    torch = pytest.importorskip("torch")
    path = shared_file(CKPT_REL)
    x = np.load(shared_file("datasets/cifar10/test.npz"))["x"][:16].astype(np.float32) / 255.0

    net = torch_small_vgg()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["net"])
    net.eval()
    with torch.no_grad():
        want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()

    variables, _ = load_model(path, "small_vgg", 10)
    got = np.asarray(get_model("small_vgg", 10).apply(variables, x))
    assert np.max(np.abs(got - want)) <= 1e-4


# ---------------------------------------------------------------- unsafe / corrupt files


def write_torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
    return path


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = write_torch_zip(tmp_path / "evil.pth", pickle.dumps({"net": Evil()}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        load_torch_checkpoint(ckpt)
    msg = str(e.value)
    assert "forbidden global" in msg and f"{os.system.__module__}.system" in msg
    assert not marker.exists()


def test_truncated_storage(tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "ok.pth"
    torch.save({"net": torch_small_vgg().state_dict()}, src)
    dst = tmp_path / "short.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if "/data/" in info.filename and len(data) > 100:
                data = data[: len(data) // 2]
            zout.writestr(info, data)
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint.*truncated"):
        load_torch_checkpoint(dst)


def test_out_of_bounds_stride_is_refused(tmp_path):
    """A crafted tensor whose strides reach past its storage must not read foreign memory."""
    torch = pytest.importorskip("torch")

    class Storage:  # pickled as a persistent id, like torch's storages
        pass

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Storage(), 0, (4, 4), (1000, 1), False, {}))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"net": {"features.0.weight": Tensor()}})
    ckpt = write_torch_zip(tmp_path / "oob.pth", buf.getvalue(), {"0": bytes(16)})
    with pytest.raises(CheckpointError, match="runs past its storage"):
        load_torch_checkpoint(ckpt)


def test_random_bytes_are_corrupt(tmp_path):
    bad = tmp_path / "random.pth"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        load_model(bad)


def test_truncated_zip_is_corrupt(tmp_path):
    data = shared_file(CKPT_REL).read_bytes()
    bad = tmp_path / "half.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        load_torch_checkpoint(bad)


def test_garbage_pickle_is_corrupt(tmp_path):
    ckpt = write_torch_zip(tmp_path / "garbage.pth", b"\x80\x02not a pickle at all")
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        load_torch_checkpoint(ckpt)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as e:
        load_model(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.npz")


def test_legacy_format_is_explained(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "legacy.pth"
    torch.save({"net": torch_small_vgg().state_dict()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy.*_use_new_zipfile_serialization=True"):
        load_torch_checkpoint(path)


# ---------------------------------------------------------------- architecture / classes


def test_wrong_width_names_tensor_and_shapes(tmp_path):
    torch = pytest.importorskip("torch")
    sd = torch_small_vgg().state_dict()
    sd["features.3.weight"] = torch.zeros(16, 32, 3, 3)
    path = tmp_path / "wide.pth"
    torch.save({"net": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_torch_checkpoint(path, num_classes=10)
    msg = str(e.value)
    assert "features.3.weight" in msg and "(16, 32, 3, 3)" in msg and "(32, 32, 3, 3)" in msg


def test_missing_and_unexpected_keys(tmp_path):
    torch = pytest.importorskip("torch")
    sd = torch_small_vgg().state_dict()
    del sd["features.9.running_var"]
    torch.save(sd, tmp_path / "missing.pth")  # bare state_dict, no 'net' wrapper
    with pytest.raises(CheckpointError, match=r"'features\.9\.running_var' is missing"):
        load_torch_checkpoint(tmp_path / "missing.pth")

    sd = torch_small_vgg().state_dict()
    sd["features.30.weight"] = torch.zeros(3)
    torch.save({"net": sd}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'features\.30\.weight'"):
        load_torch_checkpoint(tmp_path / "extra.pth")


def test_integer_tensor_is_architecture_error(tmp_path):
    torch = pytest.importorskip("torch")
    sd = torch_small_vgg().state_dict()
    sd["features.0.bias"] = torch.zeros(32, dtype=torch.int64)
    torch.save({"net": sd}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=r"features\.0\.bias.*int64"):
        load_torch_checkpoint(tmp_path / "int.pth")


def test_wrong_class_count(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "gtsrb.pth"
    torch.save({"net": torch_small_vgg(num_classes=43).state_dict(), "acc": 90.0}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, "small_vgg", num_classes=10)
    msg = str(e.value)
    # The class count comes from --dataset (cifar10: 10, gtsrb: 43); there is no --num-classes.
    assert "43 outputs" in msg and "10 classes" in msg and "--dataset gtsrb" in msg
    assert "--num-classes" not in msg
    # Inferred when not given.
    variables, meta = load_torch_checkpoint(path)
    assert meta["num_classes"] == 43 and meta["acc"] == 90.0
    assert variables["params"]["classifier"]["kernel"].shape == (2048, 43)


def test_strided_tensor_and_shared_storage(tmp_path):
    """Non-contiguous tensors (views into one storage) are rebuilt with their strides."""
    torch = pytest.importorskip("torch")
    sd = torch_small_vgg().state_dict()
    base = torch.arange(32 * 2048 * 2, dtype=torch.float32).reshape(32, 2048, 2)
    sd["classifier.weight"] = base[:10, :, 1]  # strided view, offset 1
    torch.save({"net": sd}, tmp_path / "strided.pth")
    variables, _ = load_torch_checkpoint(tmp_path / "strided.pth")
    np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"],
                                  base[:10, :, 1].numpy().T)


# ---------------------------------------------------------------- own format


def random_variables(num_classes: int = 10):
    return jax.tree.map(np.asarray, init_variables(get_model("small_vgg", num_classes), seed=3))


def test_own_format_round_trip(tmp_path):
    variables = random_variables()
    path = tmp_path / "sub" / "model.npz"
    save_checkpoint(path, variables, {"model": "small_vgg", "num_classes": 10, "note": "x"})
    got, meta = load_model(path)
    assert meta == {"model": "small_vgg", "num_classes": 10, "note": "x", "format": 1}
    a, b = flat(variables), flat(got)
    assert set(a) == set(b)
    for p in a:
        assert a[p].dtype == b[p].dtype
        np.testing.assert_array_equal(a[p], b[p])
    assert sorted(os.listdir(path.parent)) == ["model.npz"]  # no temp files left
    # Overwrite in place, still atomic and clean.
    save_checkpoint(path, variables, {"model": "small_vgg", "num_classes": 10})
    assert sorted(os.listdir(path.parent)) == ["model.npz"]
    with np.load(path, allow_pickle=False) as npz:
        assert "params/conv0/kernel" in npz.files


def test_torch_import_then_own_format(tmp_path):
    variables, meta = load_torch_checkpoint(shared_file(CKPT_REL))
    save_checkpoint(tmp_path / "m.npz", variables, meta)
    got, meta2 = load_checkpoint(tmp_path / "m.npz")
    assert meta2["acc"] == meta["acc"]
    for p, leaf in flat(variables).items():
        np.testing.assert_array_equal(flat(got)[p], leaf)


def test_failed_save_leaves_no_temp_file(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "m.npz", random_variables(),
                        {"model": "small_vgg", "num_classes": 10, "bad": object()})
    assert os.listdir(tmp_path) == []


def test_meta_validation(tmp_path):
    with pytest.raises(CheckpointError, match="num_classes"):
        save_checkpoint(tmp_path / "m.npz", random_variables(), {"model": "small_vgg"})
    # A file without the required meta fields (written by hand) is rejected on load.
    arrays = {"/".join(p): v for p, v in flat(random_variables()).items()}
    bad_meta = np.frombuffer(b'{"format": 1, "model": "small_vgg"}', np.uint8)
    np.savez(tmp_path / "nometa.npz", **arrays, __meta__=bad_meta)
    with pytest.raises(CheckpointError, match="num_classes"):
        load_checkpoint(tmp_path / "nometa.npz")
    np.savez(tmp_path / "nometa2.npz", **arrays)
    with pytest.raises(CheckpointError, match="__meta__"):
        load_checkpoint(tmp_path / "nometa2.npz")


def test_own_format_model_and_class_mismatch(tmp_path):
    path = tmp_path / "m43.npz"
    save_checkpoint(path, random_variables(43), {"model": "small_vgg", "num_classes": 43})
    with pytest.raises(CheckpointError, match="43 outputs while the data set has 10 classes; pass --dataset gtsrb"):
        load_model(path, num_classes=10)
    # meta that disagrees with the stored tree is caught too.
    save_checkpoint(path, random_variables(43), {"model": "small_vgg", "num_classes": 10})
    with pytest.raises(CheckpointError, match="classifier"):
        load_checkpoint(path)


def test_corrupt_npz(tmp_path):
    path = tmp_path / "m.npz"
    save_checkpoint(path, random_variables(), {"model": "small_vgg", "num_classes": 10})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not an ibau-jax checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"hello, not a zip")
    with pytest.raises(CheckpointError, match="corrupt or not an ibau-jax checkpoint"):
        load_model(path)
    # A pickled object array inside the npz must not be unpickled.
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}], dtype=object))
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="corrupt or not an ibau-jax checkpoint"):
        load_checkpoint(path)
