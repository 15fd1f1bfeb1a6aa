"""attacks.poison: poisoned training sets (counts, selection, labels) and the ASR test set."""
import numpy as np
import pytest
from PIL import Image

from ibau_jax import attacks
from conftest import TRIGGERS, make_test_attack, random_images, shared_path

ALL = tuple(n for n in attacks.ATTACK_NAMES if n != "multi_trigger")  # one trigger each; multi below


_rand, _make = random_images, make_test_attack


def _data(n=200, seed=0):
    return _rand(n, seed), np.arange(n) % 10


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


def test_selection_is_the_documented_draw():
    # int(round(ratio * N)) images, default_rng(seed).choice(eligible, k, replace=False), sorted
    x, y = _data()
    ps = attacks.poison_dataset(x, y, _make("badnets"), 0.1, seed=11)
    eligible = np.flatnonzero(y != 2)
    expect = np.sort(np.random.default_rng(11).choice(eligible, 20, replace=False))
    np.testing.assert_array_equal(ps.poisoned_idx, expect)


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


def test_target_labels_and_asr_set():
    x, y = _data(20)
    for name, expect in [("badnets", np.full(20, 2)), ("badnets_all2all", (y + 1) % 10), ("sig", np.full(20, 2))]:
        a = _make(name)
        np.testing.assert_array_equal(a.target_labels(y), expect)
        xt, lab, keep = attacks.asr_test_set(x, y, a)
        assert xt.shape == x.shape and xt.min() >= 0 and xt.max() <= 1
        assert lab.dtype == np.int32 and keep.dtype == bool
        np.testing.assert_array_equal(lab, expect)
        np.testing.assert_array_equal(keep, expect != y)
        np.testing.assert_allclose(xt, np.asarray(a.apply(x)))


@pytest.mark.parametrize("name", ["badnets", "trojan_sq", "trojan_wm", "l2_inv", "l0_inv"])
def test_asr_set_of_the_original_triggers_is_the_original_codes(name):
    # every image triggered by clip(x * keep + png / 255, 0, 1), every label = target (all-to-one);
    # 2100 images span several jitted chunks
    x = _rand(2100, 5)
    y = np.arange(2100) % 10
    keep = np.ones((32, 32, 3), np.float32)
    pattern = np.zeros((32, 32, 3), np.float32)
    if name == "badnets":
        keep[27:31, 27:31], pattern[27:31, 27:31] = 0, 1
    else:
        d = shared_path(TRIGGERS)
        pattern = np.asarray(Image.open(d / f"{name}.png").convert("RGB"), np.float32) / np.float32(255)
        if name == "l0_inv":
            keep = (1 - np.transpose(np.load(d / "mask.npy"), (1, 2, 0))).astype(np.float32)
    xt, lab, kept = attacks.asr_test_set(x, y, _make(name, target=8))
    assert xt.dtype == np.float32 and lab.dtype == np.int32
    ref = np.clip(x * keep + pattern, 0, 1)
    if name == "l0_inv":  # keep is fractional: a fused multiply-add may round once instead of twice
        np.testing.assert_allclose(xt, ref, atol=1e-6, rtol=0)
    else:
        np.testing.assert_array_equal(xt, ref)
    np.testing.assert_array_equal(lab, np.full(2100, 8))
    np.testing.assert_array_equal(kept, y != 8)


def test_wanet_noise_options():
    x, y = _data()
    ps = attacks.poison_dataset(x, y, _make("wanet"), 0.1, 0, noise_ratio=0.05)
    assert len(ps.noise_idx) == 10
    ps = attacks.poison_dataset(x, y, _make("wanet", noise=False), 0.1, 0)
    assert len(ps.noise_idx) == 0
    with pytest.raises(attacks.AttackError, match="noise images but only"):
        attacks.poison_dataset(x, y, _make("wanet", cross_ratio=10.0), 0.1, 0)
    with pytest.raises(attacks.AttackError, match="noise_ratio applies only to wanet"):
        attacks.poison_dataset(x, y, _make("badnets"), 0.1, 0, noise_ratio=0.05)


def test_bad_inputs():
    x, y = _data()
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
    with pytest.raises(attacks.AttackError, match=r"asr_test_set: x must be \(N, 32, 32, 3\)"):
        attacks.asr_test_set(x[:, :16], y, a)
    with pytest.raises(attacks.AttackError, match=r"y must be \(200,\) labels"):
        attacks.asr_test_set(x, y[:5], a)
    assert len(attacks.poison_dataset(_data(200)[0], np.zeros(200, int) + 3, _make("badnets_all2all"),
                                      1.0, 0).poisoned_idx) == 200  # all-to-all: everything eligible


def test_multi_trigger_poisons_each_part_with_its_own_target():
    a = _make("multi_trigger")                      # target 2: triggers -> 2, 3, 4
    assert a.targets == (2, 3, 4) and [p.name for p in a.parts] == ["badnets", "checkerboard", "blend"]
    x, y = _data(301)
    ps = attacks.poison_dataset(x, y, a, 0.1, seed=5)   # 30 images: 10 per trigger
    p = ps.poisoned_idx
    assert len(p) == 30 == len(np.unique(p)) and len(ps.noise_idx) == 0
    # the documented draw: the parts in order, one generator, earlier parts' images excluded
    rng, taken = np.random.default_rng(5), np.zeros(301, bool)
    for part in a.parts:
        idx = np.sort(rng.choice(np.flatnonzero((y != part.target) & ~taken), 10, replace=False))
        taken[idx] = True
        np.testing.assert_array_equal(ps.y[idx], part.target)
        np.testing.assert_allclose(ps.x[idx], np.asarray(part.apply(x[idx])), atol=1e-6)
    np.testing.assert_array_equal(p, np.flatnonzero(taken))
    rest = np.flatnonzero(~taken)
    np.testing.assert_array_equal(ps.x[rest], x[rest])
    np.testing.assert_array_equal(ps.y[rest], y[rest])
    # 31 images: the first part takes the extra one
    ps = attacks.poison_dataset(x, y, a, 31 / 301, seed=5)
    assert [int((ps.y[ps.poisoned_idx] == t).sum()) for t in a.targets] == [11, 10, 10]


def test_multi_trigger_asr_set_is_every_trigger_on_every_image():
    x, y = _data(20)
    a = _make("multi_trigger", target=8)            # targets wrap: 8, 9, 0
    assert a.targets == (8, 9, 0)
    xt, lab, keep = attacks.asr_test_set(x, y, a)
    assert xt.shape == (60, 32, 32, 3) and lab.dtype == np.int32
    np.testing.assert_array_equal(lab, np.repeat([8, 9, 0], 20))
    true = attacks.asr_true_labels(y, a)
    np.testing.assert_array_equal(true, np.tile(y, 3))
    np.testing.assert_array_equal(keep, lab != true)
    for i, part in enumerate(a.parts):
        np.testing.assert_allclose(xt[20 * i:20 * (i + 1)], np.asarray(part.apply(x)), atol=1e-6)
    np.testing.assert_array_equal(attacks.asr_true_labels(y, _make("badnets")), y)


def test_multi_trigger_refusals():
    a = _make("multi_trigger")
    with pytest.raises(attacks.AttackError, match=r"3 triggers.*attack\.parts\[i\]"):
        a.apply(_rand(2))
    with pytest.raises(attacks.AttackError, match="target_labels"):
        a.target_labels(np.zeros(2, int))
    with pytest.raises(attacks.AttackError, match="fewer than the 3 triggers"):
        attacks.poison_dataset(*_data(200), a, 0.01, seed=0)
    with pytest.raises(attacks.AttackError, match="at least 3 classes"):
        attacks.get("multi_trigger", num_classes=2, target=0)
    with pytest.raises(attacks.AttackError, match="does not fit"):
        attacks.get("multi_trigger", num_classes=10, size=16)
