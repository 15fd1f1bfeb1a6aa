import numpy as np
import pytest
from PIL import Image

from ibau_jax import attacks
from conftest import TRIGGERS, shared_path


def _rand(n=4, seed=0):
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def test_badnets_patch_exact():
    x = _rand()
    out = np.asarray(attacks.load_trigger("badnets")(x))
    assert np.all(out[:, 27:31, 27:31, :] == 1.0)
    mask = np.ones((32, 32), bool)
    mask[27:31, 27:31] = False
    np.testing.assert_array_equal(out[:, mask], x[:, mask])


@pytest.mark.parametrize("name", ["trojan_sq", "trojan_wm", "l2_inv"])
def test_additive_triggers_follow_original_rule(name):
    d = shared_path(TRIGGERS)
    png = np.asarray(Image.open(d / f"{name}.png").convert("RGB"), np.float64) / 255
    x = _rand()
    expect = np.clip(x.astype(np.float64) + png, 0, 1)
    out = np.asarray(attacks.load_trigger(name, d)(x))
    np.testing.assert_allclose(out, expect, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1


def test_l0_inv_uses_mask():
    d = shared_path(TRIGGERS)
    png = np.asarray(Image.open(d / "l0_inv.png").convert("RGB"), np.float64) / 255
    mask = np.transpose(np.load(d / "mask.npy"), (1, 2, 0))
    x = _rand()
    expect = np.clip(x * (1 - mask) + png, 0, 1)
    np.testing.assert_allclose(np.asarray(attacks.load_trigger("l0_inv", d)(x)), expect, atol=1e-6)


def test_unknown_attack_and_missing_files(tmp_path):
    with pytest.raises(attacks.AttackError, match="unknown attack 'nope'.*badnets"):
        attacks.load_trigger("nope")
    with pytest.raises(attacks.AttackError, match="--trigger-dir"):
        attacks.load_trigger("trojan_sq")
    with pytest.raises(attacks.AttackError, match="trojan_wm.png not found"):
        attacks.load_trigger("trojan_wm", tmp_path)
    (tmp_path / "l2_inv.png").write_bytes(b"not a png")
    with pytest.raises(attacks.AttackError, match="not a readable image"):
        attacks.load_trigger("l2_inv", tmp_path)
    Image.new("RGB", (16, 16)).save(tmp_path / "trojan_sq.png")
    with pytest.raises(attacks.AttackError, match=r"shape \(16, 16, 3\), expected \(32, 32, 3\)"):
        attacks.load_trigger("trojan_sq", tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "l0_inv.png")
    with pytest.raises(attacks.AttackError, match="mask.npy"):
        attacks.load_trigger("l0_inv", tmp_path)


def test_target_check_and_asr_set():
    with pytest.raises(attacks.AttackError, match="outside 0..9"):
        attacks.check_target(10, 10)
    x = _rand(6)
    y = np.arange(6)
    xt, t = attacks.poisoned_test_set(x, y, attacks.badnets(), 3)
    assert xt.shape == x.shape and np.all(t == 3)
