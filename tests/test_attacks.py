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


# =========================================================================== poisoning API

ALL = attacks.ATTACK_NAMES


def _make(name, **kw):
    trig = shared_path(TRIGGERS) if name in attacks.FILE_TRIGGERS else None
    kw.setdefault("num_classes", 10)
    kw.setdefault("target", 2)
    return attacks.make_attack(name, trigger_dir=trig, **kw)


def _data(n=200, seed=0):
    x = _rand(n, seed)
    y = np.arange(n) % 10
    return x, y


def _ratio(name):
    return 0.05 if name == "sig" else 0.1  # sig: only the 20 target-class images are eligible


@pytest.mark.parametrize("name", ALL)
def test_poison_dataset_counts_labels_range(name):
    a = _make(name)
    x, y = _data()
    x0, y0 = x.copy(), y.copy()
    ps = attacks.poison_dataset(x, y, a, _ratio(name), seed=0)
    np.testing.assert_array_equal(x, x0)  # inputs untouched
    np.testing.assert_array_equal(y, y0)
    assert ps.x.shape == x.shape and ps.x.dtype == np.float32 and ps.y.shape == y.shape
    assert ps.x.min() >= 0 and ps.x.max() <= 1
    n_poison = int(round(_ratio(name) * len(x)))
    assert len(ps.poisoned_idx) == n_poison == len(np.unique(ps.poisoned_idx))
    p = ps.poisoned_idx
    if a.all_to_all:
        assert name == "badnets_all2all" and not a.clean_label
        np.testing.assert_array_equal(ps.y[p], (y[p] + 1) % 10)
    elif a.clean_label:
        assert name == "sig"
        assert np.all(y[p] == 2)  # only target-class images poisoned
        np.testing.assert_array_equal(ps.y, y)  # labels kept
    else:
        assert np.all(y[p] != 2) and np.all(ps.y[p] == 2)
    untouched = np.setdiff1d(np.arange(len(x)), np.concatenate([p, ps.noise_idx]))
    np.testing.assert_array_equal(ps.x[untouched], x[untouched])
    np.testing.assert_array_equal(ps.y[untouched], y[untouched])
    np.testing.assert_allclose(ps.x[p], np.asarray(a.apply(x[p])), atol=1e-6)
    assert not np.array_equal(ps.x[p], x[p])
    if name == "wanet":
        assert len(ps.noise_idx) == 2 * n_poison and not set(ps.noise_idx) & set(p)
        np.testing.assert_array_equal(ps.y[ps.noise_idx], y[ps.noise_idx])  # noise keeps labels
        assert not np.array_equal(ps.x[ps.noise_idx], x[ps.noise_idx])
    else:
        assert len(ps.noise_idx) == 0


@pytest.mark.parametrize("name", ALL)
def test_selection_deterministic_per_seed(name):
    a = _make(name)
    x, y = _data()
    r1 = attacks.poison_dataset(x, y, a, _ratio(name), seed=3)
    r2 = attacks.poison_dataset(x, y, a, _ratio(name), seed=3)
    r3 = attacks.poison_dataset(x, y, a, _ratio(name), seed=4)
    np.testing.assert_array_equal(r1.x, r2.x)
    np.testing.assert_array_equal(r1.poisoned_idx, r2.poisoned_idx)
    assert not np.array_equal(r1.poisoned_idx, r3.poisoned_idx)


@pytest.mark.parametrize("name", ["blend", "wanet"])
def test_random_triggers_depend_on_seed(name):
    x, _ = _data(4)
    a0, a0b, a1 = _make(name, seed=0), _make(name, seed=0), _make(name, seed=1)
    np.testing.assert_array_equal(np.asarray(a0.apply(x)), np.asarray(a0b.apply(x)))
    assert not np.allclose(np.asarray(a0.apply(x)), np.asarray(a1.apply(x)))


def test_target_labels_and_asr_set():
    x, y = _data(20)
    for name, expect in [("badnets", np.full(20, 2)), ("badnets_all2all", (y + 1) % 10), ("sig", np.full(20, 2))]:
        a = _make(name)
        np.testing.assert_array_equal(a.target_labels(y), expect)
        xt, lab, keep = attacks.asr_test_set(x, y, a)
        assert xt.shape == x.shape and xt.min() >= 0 and xt.max() <= 1
        np.testing.assert_array_equal(lab, expect)
        np.testing.assert_array_equal(keep, expect != y)
        np.testing.assert_allclose(xt, np.asarray(a.apply(x)))
    a = _make("badnets")
    xt, lab, _ = attacks.asr_test_set(x, y, a)
    old_x, old_t = attacks.poisoned_test_set(x, y, a.trigger, 2)
    np.testing.assert_array_equal(xt, old_x)
    np.testing.assert_array_equal(lab, old_t)


def test_badnets_attack_matches_patch():
    x, _ = _data(3)
    np.testing.assert_array_equal(np.asarray(_make("badnets").apply(x)), np.asarray(attacks.badnets()(x)))


def test_blend_formula_exact(tmp_path):
    x, _ = _data(5)
    a = _make("blend", alpha=0.3, seed=7)
    p = np.random.default_rng(7).random((32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(a.apply(x)), 0.7 * x.astype(np.float64) + 0.3 * p, atol=1e-6)
    assert _make("blend").params["alpha"] == 0.2
    img = (np.arange(64 * 64 * 3) % 256).astype(np.uint8).reshape(64, 64, 3)
    Image.fromarray(img).save(tmp_path / "p.png")
    a = _make("blend", pattern_path=tmp_path / "p.png")
    expect = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR), np.float64) / 255
    np.testing.assert_allclose(np.asarray(a.apply(x)), 0.8 * x + 0.2 * expect, atol=1e-6)
    with pytest.raises(attacks.AttackError, match="not found"):
        _make("blend", pattern_path=tmp_path / "missing.png")


def test_sig_formula_exact():
    x, _ = _data(5)
    j = np.arange(32)
    sig = (20 / 255) * np.sin(2 * np.pi * j * 6 / 32)
    expect = np.clip(x.astype(np.float64) + sig[None, None, :, None], 0, 1)
    np.testing.assert_allclose(np.asarray(_make("sig").apply(x)), expect, atol=1e-6)


def test_wanet_identity_at_zero_strength_and_smooth():
    x, _ = _data(4)
    a0 = _make("wanet", s=0.0)
    np.testing.assert_allclose(np.asarray(a0.apply(x)), x, atol=1e-5)
    a = _make("wanet")
    assert a.params["k"] == 4 and a.params["s"] == 0.5
    out = np.asarray(a.apply(x))
    assert np.abs(out - x).max() > 0.1 and out.min() >= 0 and out.max() <= 1
    # bilinear sampling is exact on a linear ramp: the output is the sampling position itself
    ramp = np.broadcast_to((np.arange(32) / 31.0)[None, None, :, None], (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(a.apply(ramp))[0, :, :, 0], (a.grid[..., 0] + 1) / 2, atol=1e-5)
    const = np.full((1, 32, 32, 3), 0.4, np.float32)
    np.testing.assert_allclose(np.asarray(a.apply(const)), const, atol=1e-6)
    # smooth: a sub-pixel displacement field whose neighbouring values differ far less than its size
    disp = (a.grid - attacks.identity_grid(32, 32)) * 15.5  # in pixels
    assert 0.05 < np.abs(disp).max() < 1.5
    inner = disp[1:-1, 1:-1]  # the outermost rows/cols are where the clip to [-1, 1] bites
    step = max(np.abs(np.diff(inner, axis=0)).max(), np.abs(np.diff(inner, axis=1)).max())
    assert step < 0.25 * np.abs(disp).max()
    # noise mode grids: random, different from the fixed grid, within [-1, 1]
    g = a.noise_grids(3, np.random.default_rng(0))
    assert g.shape == (3, 32, 32, 2) and np.abs(g).max() <= 1
    assert 0 < np.abs(g - a.grid).max() <= 1 / 32 + 1e-6


def test_wanet_noise_options():
    x, y = _data()
    ps = attacks.poison_dataset(x, y, _make("wanet"), 0.1, 0, noise_ratio=0.05)
    assert len(ps.noise_idx) == 10
    ps = attacks.poison_dataset(x, y, _make("wanet", noise=False), 0.1, 0)
    assert len(ps.noise_idx) == 0
    with pytest.raises(attacks.AttackError, match="noise images but only"):
        attacks.poison_dataset(x, y, _make("wanet", cross_ratio=10.0), 0.1, 0)


def test_bad_inputs():
    x, y = _data()
    with pytest.raises(attacks.AttackError, match="unknown attack 'nope'; choose one of badnets, .*wanet"):
        attacks.make_attack("nope", num_classes=10)
    with pytest.raises(attacks.AttackError, match="target class 10 is outside 0..9"):
        attacks.make_attack("badnets", num_classes=10, target=10)
    with pytest.raises(attacks.AttackError, match="target class -1 is outside"):
        attacks.make_attack("sig", num_classes=10, target=-1)
    with pytest.raises(attacks.AttackError, match="no option.*strength.*its options: k, s"):
        attacks.make_attack("wanet", num_classes=10, strength=1)
    with pytest.raises(attacks.AttackError, match="needs its trigger file"):
        attacks.make_attack("trojan_sq", num_classes=10)
    a = _make("badnets")
    for bad in (0, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(attacks.AttackError, match=rf"poison ratio {bad!r} is outside the valid range \(0, 1\]"):
            attacks.poison_dataset(x, y, a, bad, 0)
    with pytest.raises(attacks.AttackError, match="asks for 200 poisoned images but only 180 are eligible"):
        attacks.poison_dataset(x, y, a, 1.0, 0)
    with pytest.raises(attacks.AttackError, match="asks for 40 .* only 20 are eligible .*target class 2"):
        attacks.poison_dataset(x, y, _make("sig"), 0.2, 0)
    with pytest.raises(attacks.AttackError, match="rounds to 0"):
        attacks.poison_dataset(x, y, a, 0.001, 0)
    with pytest.raises(attacks.AttackError, match="dtype uint8"):
        attacks.poison_dataset((x * 255).astype(np.uint8), y, a, 0.1, 0)
    with pytest.raises(attacks.AttackError, match="labels must lie in 0..9"):
        attacks.poison_dataset(x, y + 5, a, 0.1, 0)
    assert len(attacks.poison_dataset(_data(200)[0], np.zeros(200, int) + 3, _make("badnets_all2all"),
                                      1.0, 0).poisoned_idx) == 200  # all-to-all: everything eligible


def test_apply_is_jittable():
    import jax
    x, _ = _data(2)
    for name in ALL:
        a = _make(name)
        np.testing.assert_allclose(np.asarray(jax.jit(a.apply)(x)), np.asarray(a.apply(x)), atol=1e-6)
