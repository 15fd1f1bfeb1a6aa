"""Hardening of ibau_jax.checkpoints (issue "Hardening"): non-finite weights, bounded parsing of
crafted .pth archives (huge views, zip bombs), .npz dtypes and meta, the class-count message,
and the mode of written files."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import stat
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ibau_jax.checkpoints import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_model,
    load_torch_checkpoint,
    save_checkpoint,
)
from ibau_jax.errors import UserError
from conftest import CIFAR_DIR, CKPT, TRIGGERS, shared_path
from test_checkpoints import flat, random_variables, torch_small_vgg

META10 = {"model": "small_vgg", "num_classes": 10}


def npz_arrays(num_classes: int = 10, meta: dict | None = None) -> dict[str, np.ndarray]:
    """The entries save_checkpoint writes, to be tampered with and written by np.savez."""
    arrays = {"/".join(p): v for p, v in flat(random_variables(num_classes)).items()}
    meta = {**(meta or {"model": "small_vgg", "num_classes": num_classes}), "format": 1}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return arrays


def peak_traced_bytes(fn) -> int:
    """Peak Python + numpy heap (numpy reports its buffers to tracemalloc) while running ``fn``."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# ================================================================ 1. non-finite weights


@pytest.mark.parametrize("key,flax_path,bad", [
    ("features.0.weight", "params/conv0/kernel", [np.nan, np.inf, -np.inf]),
    ("features.17.running_var", "batch_stats/bn4/var", [np.inf]),  # BN running stats count too
    ("classifier.bias", "params/classifier/bias", [np.nan, np.nan]),
])
def test_torch_nonfinite_weights_are_refused(tmp_path, key, flax_path, bad):
    torch = pytest.importorskip("torch")
    sd = torch_small_vgg().state_dict()
    sd[key].view(-1)[: len(bad)] = torch.tensor(bad)
    path = tmp_path / "nan.pth"
    torch.save({"net": sd}, path)
    for load in (lambda: load_torch_checkpoint(path), lambda: load_model(path, "small_vgg", 10)):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = str(e.value)
        assert f"tensor '{key}' ({flax_path}) holds {len(bad)} NaN/Inf values" in msg, msg
        assert "retrain" in msg and "\n" not in msg


def test_torch_float64_overflowing_float32_is_refused(tmp_path):
    """A finite float64 weight beyond float32's range would turn into Inf on import."""
    torch = pytest.importorskip("torch")
    sd = torch_small_vgg().state_dict()
    sd["classifier.weight"] = sd["classifier.weight"].double()
    sd["classifier.weight"][0, :4] = 1e300
    torch.save({"net": sd}, tmp_path / "big.pth")
    with pytest.raises(CheckpointError, match=r"'classifier\.weight' \(params/classifier/kernel\) "
                                              r"\(as float32\) holds 4 NaN/Inf"):
        load_torch_checkpoint(tmp_path / "big.pth")


@pytest.mark.parametrize("name", ["params/conv3/kernel", "batch_stats/bn1/mean"])
def test_npz_nonfinite_weights_are_refused(tmp_path, name):
    variables = random_variables()
    coll, layer, leaf = name.split("/")
    variables[coll][layer][leaf] = variables[coll][layer][leaf].copy()
    variables[coll][layer][leaf].reshape(-1)[[1, 5, 7]] = [np.nan, np.inf, np.nan]
    path = tmp_path / "nan.npz"
    save_checkpoint(path, variables, META10)
    for load in (lambda: load_checkpoint(path), lambda: load_model(path, "small_vgg", 10)):
        with pytest.raises(CheckpointError, match=f"variable '{name}' holds 3 NaN/Inf values; the model is broken"):
            load()


def test_cli_nonfinite_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    """The case from the issue: evaluating a NaN model gave ASR 0.000 and exit 0."""
    from ibau_jax import cli

    variables, meta = load_torch_checkpoint(shared_path(CKPT))
    variables["params"]["conv0"]["kernel"][0, 0, 0, :2] = np.nan
    path = tmp_path / "nan.npz"
    save_checkpoint(path, variables, meta)
    code = cli.main(["evaluate", "--checkpoint", str(path), "--dataset", "cifar10",
                     "--data-dir", str(shared_path(CIFAR_DIR)), "--no-download",
                     "--trigger-dir", str(shared_path(TRIGGERS)), "--attack", "badnets", "--target", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "params/conv0/kernel' holds 2 NaN/Inf values" in err, err


# ================================================================ 2. bounded parsing of .pth

BOMB = 64 << 20  # bytes of zeros in a "bomb" member; deflated to ~64 KB


class _Storage:
    """Pickled as a torch persistent id, like torch's storages."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


def crafted_pickle(obj) -> bytes:
    """A data.pkl that uses only the globals the loader allows (torch's own rebuild function)."""
    torch = pytest.importorskip("torch")

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", torch.FloatStorage, o.key, "cpu", o.numel) if isinstance(o, _Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def tensor(storage: _Storage, offset: int, size: tuple, stride: tuple):
    torch = pytest.importorskip("torch")

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, {}))

    return Tensor()


def honest_records(num_classes: int = 10) -> tuple[dict, dict[str, int]]:
    """Contiguous tensor records for a small VGG state_dict (float keys) and their storages' bytes."""
    sd = torch_small_vgg(num_classes).state_dict()
    records, storages = {}, {}
    for i, (k, v) in enumerate(sd.items()):
        if v.is_floating_point():
            records[k] = tensor(_Storage(str(i), v.numel()), 0, tuple(v.shape), tuple(v.stride()))
            storages[str(i)] = v.numel() * 4
    return records, storages


def write_zeros(zf: zipfile.ZipFile, name: str, nbytes: int) -> None:
    """A deflated member of ``nbytes`` zero bytes, streamed so that the test stays small."""
    chunk = bytes(1 << 20)
    with zf.open(name, "w") as f:
        for start in range(0, nbytes, len(chunk)):
            f.write(chunk[: min(len(chunk), nbytes - start)])


def crafted_pth(path: Path, obj, members: dict[str, int], bombs: dict[str, int] | None = None,
                pkl_bomb: int = 0) -> Path:
    """A torch-style zip: data.pkl for ``obj``, stored zero storages ``members`` (key -> bytes)
    and deflated zero storages ``bombs`` (key -> bytes)."""
    with zipfile.ZipFile(path, "w") as zf:
        if pkl_bomb:
            zf.compression = zipfile.ZIP_DEFLATED
            write_zeros(zf, "archive/data.pkl", pkl_bomb)
        else:
            zf.writestr("archive/data.pkl", crafted_pickle(obj))
        zf.writestr("archive/version", "3\n")
        for key, nbytes in members.items():
            zf.writestr(f"archive/data/{key}", bytes(nbytes))
        zf.compression = zipfile.ZIP_DEFLATED
        for key, nbytes in (bombs or {}).items():
            write_zeros(zf, f"archive/data/{key}", nbytes)
    return path


def patch_declared_size(path: Path, member: str, size: int) -> None:
    """Make the zip directory (local header and central directory) lie about ``member``'s size."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        offset, pos = zf.getinfo(member).header_offset, zf.start_dir
    struct.pack_into("<I", data, offset + 22, size)
    while data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46:pos + 46 + n].decode() == member:
            struct.pack_into("<I", data, pos + 24, size)
        pos += 46 + n + m + k
    path.write_bytes(data)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo(member).file_size == size


def refused_quickly(load, match: str) -> None:
    """``load()`` raises CheckpointError matching ``match`` within 5 s and < 8 MiB of heap."""
    def run():
        with pytest.raises(CheckpointError, match=match) as e:
            load()
        assert "\n" not in str(e.value)

    t0 = time.perf_counter()
    peak = peak_traced_bytes(run)
    assert time.perf_counter() - t0 < 5
    assert peak < 8 << 20, f"peak heap {peak} bytes"


def test_honest_crafted_archive_loads(tmp_path):
    """The crafting helpers make a valid archive: what the tests below change is the only fault."""
    records, storages = honest_records()
    variables, meta = load_torch_checkpoint(crafted_pth(tmp_path / "ok.pth", {"net": records}, storages))
    assert meta["num_classes"] == 10
    assert all(np.all(v == 0) for v in flat(variables).values())


@pytest.mark.parametrize("where", ["features.0.weight", "unused top-level key"])
def test_stride_zero_huge_view_is_refused(tmp_path, where):
    """A record with stride 0 and a huge size (only allowed globals) once made the loader try to
    allocate petabytes; it is refused from its record alone, wherever it sits in the file."""
    records, storages = honest_records()
    huge = tensor(_Storage("huge", 4), 0, (2 ** 24, 2 ** 24, 2 ** 3), (0, 0, 0))  # 2**51 floats: 8 PiB
    obj = {"net": records}
    if where == "features.0.weight":
        records[where] = huge
    else:
        obj["evil"] = huge
    path = crafted_pth(tmp_path / "huge.pth", obj, {**storages, "huge": 16})
    refused_quickly(lambda: load_torch_checkpoint(path),
                    r"size \(16777216, 16777216, 8\) \(stride \(0, 0, 0\)\) has 2251799813685248 elements, "
                    r"more than its storage's 4")


def test_storage_over_the_model_budget_is_refused_before_reading(tmp_path):
    """A 64 MiB deflated storage (64 KB on disk) behind an honest classifier view: the loader
    refuses it from its declared size (over 4x the model's weights), reading none of it."""
    records, storages = honest_records()
    records["classifier.weight"] = tensor(_Storage("bomb", BOMB // 4), 0, (10, 2048), (2048, 1))
    path = crafted_pth(tmp_path / "budget.pth", {"net": records}, storages, bombs={"bomb": BOMB})
    assert path.stat().st_size < BOMB // 16  # the model's 1.2 MB plus ~64 KB of deflated zeros
    refused_quickly(lambda: load_torch_checkpoint(path), r"refusing to read \d+ bytes of tensor storage: "
                    r"a small_vgg with 10 classes needs at most \d+")


def test_member_larger_than_its_record_is_refused_before_reading(tmp_path):
    """The 408 KB file of the issue: a small record whose member inflates to far more bytes."""
    records, storages = honest_records()
    key = next(k for k, v in storages.items() if v == 10 * 2048 * 4)
    del storages[key]
    path = crafted_pth(tmp_path / "bomb.pth", {"net": records}, storages, bombs={key: BOMB})
    refused_quickly(lambda: load_torch_checkpoint(path),
                    rf"storage 'data/{key}' holds {BOMB} bytes, but its record declares 20480 x 4-byte")


def test_lying_zip_directory_reads_only_declared_bytes(tmp_path):
    """The directory says 80 KB, the deflated stream holds 64 MiB: at most the declared bytes
    come out (then the CRC disagrees), so memory stays small."""
    records, storages = honest_records()
    key = next(k for k, v in storages.items() if v == 10 * 2048 * 4)
    del storages[key]
    path = crafted_pth(tmp_path / "liar.pth", {"net": records}, storages, bombs={key: BOMB})
    patch_declared_size(path, f"archive/data/{key}", 10 * 2048 * 4)
    refused_quickly(lambda: load_torch_checkpoint(path), "corrupt or not a PyTorch checkpoint.*CRC")


def test_pickle_bomb_is_refused_by_declared_size(tmp_path):
    path = crafted_pth(tmp_path / "pkl.pth", None, {}, pkl_bomb=BOMB)
    refused_quickly(lambda: load_torch_checkpoint(path), rf"data\.pkl declares {BOMB} bytes")


def test_torch_save_with_inflated_storage_member(tmp_path):
    """Same fault from a real torch.save file: one storage member rewritten bigger (deflated)."""
    src = tmp_path / "ok.pth"
    pytest.importorskip("torch").save({"net": torch_small_vgg().state_dict()}, src)
    dst = tmp_path / "inflated.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        victim = next(i.filename for i in zin.infolist() if i.file_size == 10 * 2048 * 4)
        for info in zin.infolist():
            if info.filename == victim:
                write_zeros(zout, info.filename, BOMB)
            else:
                zout.writestr(info.filename, zin.read(info))
    assert dst.stat().st_size < 2 << 20
    refused_quickly(lambda: load_model(dst, "small_vgg", 10), rf"holds {BOMB} bytes, but its record declares")


# ================================================================ 3. .npz dtypes and meta


class _Evil:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("dtype", ["complex64", "int8", "<U4", "object", "bool", "V2"])
def test_npz_non_float_dtypes_are_refused(tmp_path, dtype):
    arrays = npz_arrays()
    kernel = arrays["params/conv0/kernel"]
    if dtype == "object":
        _Evil.marker = tmp_path / "pwned"
        bad = np.array([_Evil()] * kernel.size, dtype=object).reshape(kernel.shape)
    elif dtype == "V2":  # what bfloat16 would become in .npy: raw 2-byte voids
        bad = np.zeros(kernel.shape, "V2")
    else:
        bad = kernel.astype(dtype)
    arrays["params/conv0/kernel"] = bad
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    for load in (lambda: load_checkpoint(path), lambda: load_model(path, "small_vgg", 10)):
        with pytest.raises(CheckpointError, match=rf"variable 'params/conv0/kernel' has dtype "
                                                  rf"{np.dtype(dtype)}, not a real floating type"):
            load()
    if dtype == "object":
        assert not _Evil.marker.exists()


def test_npz_other_float_dtypes_load_as_saved(tmp_path):
    variables = random_variables()
    variables["params"]["conv0"]["kernel"] = variables["params"]["conv0"]["kernel"].astype(np.float16)
    variables["batch_stats"]["bn2"]["var"] = variables["batch_stats"]["bn2"]["var"].astype(np.float64)
    variables["params"]["bn1"]["scale"] = variables["params"]["bn1"]["scale"].astype(">f4")  # big-endian
    variables["params"]["classifier"]["bias"] = variables["params"]["classifier"]["bias"].astype(ml_dtypes.bfloat16)
    save_checkpoint(tmp_path / "m.npz", variables, META10)
    got, _ = load_model(tmp_path / "m.npz", "small_vgg", 10)
    want = {"params/conv0/kernel": np.float16, "batch_stats/bn2/var": np.float64,
            "params/bn1/scale": np.float32, "params/classifier/bias": np.float32}  # bf16 -> f32, exact
    for p, leaf in flat(variables).items():
        name = "/".join(p)
        assert flat(got)[p].dtype == np.dtype(want.get(name, np.float32)), name
        np.testing.assert_array_equal(flat(got)[p], np.asarray(leaf, np.float64), err_msg=name)


def test_save_refuses_non_float_variables(tmp_path):
    variables = random_variables()
    variables["params"]["conv0"]["bias"] = np.zeros(32, np.int8)
    with pytest.raises(CheckpointError, match="'params/conv0/bias' has dtype int8"):
        save_checkpoint(tmp_path / "m.npz", variables, META10)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("meta,match", [
    ({"format": 1, "model": "small_vgg", "num_classes": "10"}, "corrupt.*num_classes='10'"),
    ({"format": 1, "model": "small_vgg", "num_classes": True}, "corrupt.*num_classes=True"),
    ({"format": 1, "model": "small_vgg", "num_classes": 10.0}, "corrupt.*num_classes=10.0"),
    ({"format": 1, "model": "small_vgg", "num_classes": 0}, "corrupt.*num_classes=0"),
    ({"format": 1, "model": 5, "num_classes": 10}, "corrupt.*model=5"),
    ({"format": True, "model": "small_vgg", "num_classes": 10}, "unsupported checkpoint format True"),
    ([1, 2], "meta is not a JSON object"),
])
def test_npz_bad_meta_values(tmp_path, meta, match):
    arrays = npz_arrays()
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "m.npz")


@pytest.mark.parametrize("meta", [np.array(["{}"]), np.zeros(4, np.float32), np.zeros((2, 2), np.uint8),
                                  np.frombuffer(b"[" * 100_000, np.uint8)])
def test_npz_meta_must_be_utf8_json_bytes(tmp_path, meta):
    arrays = npz_arrays()
    arrays["__meta__"] = meta
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(CheckpointError, match="corrupt or not an ibau-jax checkpoint.*(__meta__|JSON)"):
        load_checkpoint(tmp_path / "m.npz")


def test_npz_wrong_shape_is_refused_before_reading(tmp_path):
    """A header declaring a huge array is refused from the header (shape), not by allocating."""
    arrays = npz_arrays()
    path = tmp_path / "m.npz"
    np.savez(path, **arrays)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2 ** 40, 3, 3, 3)})
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp_path / "huge.npz", "w") as zout:
        for info in zin.infolist():
            data = header.getvalue() if info.filename == "params/conv0/kernel.npy" else zin.read(info)
            zout.writestr(info.filename, data)
    refused_quickly(lambda: load_checkpoint(tmp_path / "huge.npz"),
                    r"'params/conv0/kernel' has shape \(1099511627776, 3, 3, 3\), the model expects \(3, 3, 3, 32\)")


def test_npz_member_bigger_than_its_header_is_refused(tmp_path):
    """A deflated member that inflates to 64 MiB behind a right-sized header: refused by size."""
    arrays = npz_arrays()
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            if name == "params/conv0/kernel":
                with zf.open(name + ".npy", "w") as f:
                    f.write(buf.getvalue())
                    for _ in range(BOMB >> 20):
                        f.write(bytes(1 << 20))
            else:
                zf.writestr(name + ".npy", buf.getvalue())
    assert path.stat().st_size < 2 << 20
    refused_quickly(lambda: load_checkpoint(path), r"entry 'params/conv0/kernel' holds \d+ bytes, its header implies")


def test_npz_foreign_entries_are_corrupt(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, **npz_arrays())
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match="corrupt.*'notes.txt' is not a .npy array"):
        load_checkpoint(path)


# ================================================================ 4. class-count message


@pytest.mark.parametrize("ckpt_classes,data_classes,fix", [
    (43, 10, r"pass --dataset gtsrb \(43 classes\) or a checkpoint trained for this data set"),
    (10, 43, r"pass --dataset cifar10 \(10 classes\) or a checkpoint trained for this data set"),
    (7, 10, r"no known data set has 7 classes \(cifar10 \(10\), gtsrb \(43\)\); pass a checkpoint trained"),
])
def test_class_mismatch_names_the_dataset(tmp_path, ckpt_classes, data_classes, fix):
    torch = pytest.importorskip("torch")
    pth = tmp_path / "m.pth"
    torch.save({"net": torch_small_vgg(num_classes=ckpt_classes).state_dict()}, pth)
    npz = tmp_path / "m.npz"
    save_checkpoint(npz, random_variables(ckpt_classes), {"model": "small_vgg", "num_classes": ckpt_classes})
    for path in (pth, npz):
        with pytest.raises(CheckpointError) as e:
            load_model(path, "small_vgg", data_classes)
        msg = str(e.value)
        assert f"class count mismatch: the checkpoint has {ckpt_classes} outputs" in msg
        assert f"while the data set has {data_classes} classes; " in msg
        assert re.search(fix, msg), msg
        assert "--num-classes" not in msg and "num_classes=" not in msg


def test_npz_model_mismatch_before_reading_weights(tmp_path):
    """Meta is checked first: the broken (NaN) weights of the wrong model are never read."""
    variables = random_variables()
    variables["params"]["conv0"]["kernel"] = np.full_like(variables["params"]["conv0"]["kernel"], np.nan)
    path = tmp_path / "m.npz"
    save_checkpoint(path, variables, META10)
    with pytest.raises(CheckpointError, match="is for model 'small_vgg', not 'resnet18'. Pass --model small_vgg"):
        load_model(path, "resnet18", 10)


# ================================================================ 5. file modes


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    umask(mask)
    (tmp_path / "plain").write_text("x")  # the reference: what open(path, "w") does
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode
    save_checkpoint(tmp_path / "m.npz", random_variables(), META10)
    atomic_write(tmp_path / "r.json", lambda f: f.write(b"{}"))
    for name in ("m.npz", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    path = tmp_path / "r.json"
    path.write_text("old")
    path.chmod(0o604)
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o604
    assert os.listdir(tmp_path) == ["r.json"]


def test_checkpoint_error_is_a_user_error():
    assert issubclass(CheckpointError, UserError)
