"""attacks.triggers: every keep/pattern trigger against its closed-form rule (numpy references)."""
import jax
import numpy as np
import pytest
from PIL import Image

from ibau_jax import attacks
from conftest import TRIGGERS, make_test_attack, random_images, shared_path


_rand, _make = random_images, make_test_attack


@pytest.mark.parametrize("name", ["badnets", "badnets_all2all"])
def test_badnets_patch_exact(name):
    x = _rand()
    out = np.asarray(attacks.get(name, num_classes=10).apply(x))
    assert np.all(out[:, 27:31, 27:31, :] == 1.0)  # rows/cols 27..30, all channels
    mask = np.ones((32, 32), bool)
    mask[27:31, 27:31] = False
    np.testing.assert_array_equal(out[:, mask], x[:, mask])


def test_badnets_size_option_moves_the_patch_corner():
    x = _rand(2)
    out = np.asarray(attacks.get("badnets", num_classes=10, size=2).apply(x))
    expect = x.copy()
    expect[:, 29:31, 29:31, :] = 1.0
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("name", ["trojan_sq", "trojan_wm", "l2_inv"])
def test_additive_file_triggers_follow_original_rule(name):
    d = shared_path(TRIGGERS)
    png = np.asarray(Image.open(d / f"{name}.png").convert("RGB"), np.float64) / 255
    x = _rand()
    expect = np.clip(x.astype(np.float64) + png, 0, 1)
    a = attacks.get(name, num_classes=10, trigger_dir=d)
    out = np.asarray(a.apply(x))
    np.testing.assert_allclose(out, expect, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    assert not a.all_to_all and not a.clean_label and a.grid is None


def test_l0_inv_uses_mask():
    d = shared_path(TRIGGERS)
    png = np.asarray(Image.open(d / "l0_inv.png").convert("RGB"), np.float64) / 255
    mask = np.transpose(np.load(d / "mask.npy"), (1, 2, 0))
    x = _rand()
    expect = np.clip(x * (1 - mask) + png, 0, 1)
    np.testing.assert_allclose(np.asarray(attacks.get("l0_inv", num_classes=10, trigger_dir=d).apply(x)),
                               expect, atol=1e-6)


def test_missing_and_corrupt_trigger_files(tmp_path):
    def get(name, trigger_dir=tmp_path):
        return attacks.get(name, num_classes=10, trigger_dir=trigger_dir)

    with pytest.raises(attacks.AttackError, match="needs its trigger file: pass --trigger-dir"):
        get("trojan_sq", None)
    with pytest.raises(attacks.AttackError, match="trojan_wm.png not found"):
        get("trojan_wm")
    (tmp_path / "l2_inv.png").write_bytes(b"not a png")
    with pytest.raises(attacks.AttackError, match="not a readable image"):
        get("l2_inv")
    Image.new("RGB", (16, 16)).save(tmp_path / "trojan_sq.png")
    with pytest.raises(attacks.AttackError, match=r"shape \(16, 16, 3\), expected \(32, 32, 3\)"):
        get("trojan_sq")
    Image.new("RGB", (32, 32)).save(tmp_path / "l0_inv.png")
    with pytest.raises(attacks.AttackError, match="mask.npy"):
        get("l0_inv")
    np.save(tmp_path / "mask.npy", np.zeros((32, 32, 3)))
    with pytest.raises(attacks.AttackError, match=r"expected \(3, 32, 32\) \(CHW\)"):
        get("l0_inv")


def test_blend_formula_exact(tmp_path):
    x = _rand(5)
    a = _make("blend", alpha=0.3, seed=7)
    p = np.random.default_rng(7).random((32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(a.apply(x)), 0.7 * x.astype(np.float64) + 0.3 * p, atol=1e-6)
    assert _make("blend").params == {"alpha": 0.2, "pattern_path": None, "seed": 0}
    img = (np.arange(64 * 64 * 3) % 256).astype(np.uint8).reshape(64, 64, 3)
    Image.fromarray(img).save(tmp_path / "p.png")
    a = _make("blend", pattern_path=tmp_path / "p.png")
    expect = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR), np.float64) / 255
    np.testing.assert_allclose(np.asarray(a.apply(x)), 0.8 * x + 0.2 * expect, atol=1e-6)
    with pytest.raises(attacks.AttackError, match="not found"):
        _make("blend", pattern_path=tmp_path / "missing.png")
    for bad in (0.0, 1.5):
        with pytest.raises(attacks.AttackError, match=rf"blend alpha {bad} is outside the valid range \(0, 1\]"):
            _make("blend", alpha=bad)


def test_sig_formula_exact():
    x = _rand(5)
    j = np.arange(32)
    sig = (20 / 255) * np.sin(2 * np.pi * j * 6 / 32)
    expect = np.clip(x.astype(np.float64) + sig[None, None, :, None], 0, 1)
    a = _make("sig")
    np.testing.assert_allclose(np.asarray(a.apply(x)), expect, atol=1e-6)
    assert a.clean_label and not a.all_to_all


@pytest.mark.parametrize("name", ["blend", "wanet"])
def test_random_triggers_depend_on_seed(name):
    x = _rand(4)
    a0, a0b, a1 = _make(name, seed=0), _make(name, seed=0), _make(name, seed=1)
    np.testing.assert_array_equal(np.asarray(a0.apply(x)), np.asarray(a0b.apply(x)))
    assert not np.allclose(np.asarray(a0.apply(x)), np.asarray(a1.apply(x)))


def test_multi_trigger_parts_are_the_documented_triggers():
    x = _rand(3)
    a = _make("multi_trigger", seed=4)
    bad, board, blend = a.parts
    np.testing.assert_allclose(np.asarray(bad.apply(x)), np.asarray(_make("badnets").apply(x)))
    np.testing.assert_allclose(np.asarray(blend.apply(x)), np.asarray(_make("blend", seed=4).apply(x)))
    # checkerboard: rows/cols 1..4 replaced by white where row + col is even, black elsewhere
    expect = x.copy()
    for r in range(4):
        for c in range(4):
            expect[:, 1 + r, 1 + c, :] = float((r + c) % 2 == 0)
    np.testing.assert_allclose(np.asarray(board.apply(x)), expect, atol=1e-6)
    assert a.params == {"size": 4, "alpha": 0.2, "seed": 4, "targets": [2, 3, 4]}


@pytest.mark.parametrize("name", [n for n in attacks.ATTACK_NAMES if n != "multi_trigger"])
def test_apply_is_jittable_and_works_on_one_image(name):
    x = _rand(2)
    a = _make(name)
    out = np.asarray(a.apply(x))
    np.testing.assert_allclose(np.asarray(jax.jit(a.apply)(x)), out, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a(x[1])), out[1], atol=1e-6)
