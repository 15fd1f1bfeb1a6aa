"""experiment.load: the original code's split of the real CIFAR-10 test set, and its errors."""
import numpy as np
import pytest
from PIL import Image

from ibau_jax import attacks, data, experiment
from conftest import CIFAR_DIR, CKPT, TRIGGERS, shared_path


@pytest.fixture(scope="module")
def exp():
    return experiment.load(shared_path(CKPT), data_dir=shared_path(CIFAR_DIR), download=False)


def test_split_is_the_original_codes(exp):
    raw = np.load(shared_path(CIFAR_DIR) / "test.npz")
    x, y = raw["x"], raw["y"]
    assert exp.clean_x.shape == (5000, 32, 32, 3) and exp.acc_x.shape == (5000, 32, 32, 3)
    assert exp.clean_x.dtype == np.float32 and 0.0 <= exp.clean_x.min() and exp.clean_x.max() <= 1.0
    # clean set = test 0..4999, accuracy set = test 5000..9999, pixels / 255
    np.testing.assert_array_equal(exp.clean_y, y[:5000])
    np.testing.assert_array_equal(exp.acc_y, y[5000:])
    np.testing.assert_allclose(exp.clean_x[:3] * 255.0, x[:3].astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(exp.acc_x[-3:] * 255.0, x[-3:].astype(np.float32), atol=1e-3)
    assert exp.num_classes == 10 and exp.target == 8


def test_asr_set_is_the_clean_set_with_the_badnets_patch(exp):
    assert np.all(exp.asr_t == 8) and exp.asr_x.shape == exp.clean_x.shape
    # the original rule: ones on rows/cols 27..30 (all channels), every other pixel untouched
    patch = np.zeros((32, 32, 3), bool)
    patch[27:31, 27:31, :] = True
    assert np.all(exp.asr_x[:, patch] == 1.0)
    np.testing.assert_array_equal(exp.asr_x[:, ~patch], exp.clean_x[:, ~patch])


def test_batches_keep_the_order(exp):
    xb, yb = exp.batches(100)
    assert xb.shape == (50, 100, 32, 32, 3) and yb.shape == (50, 100)
    np.testing.assert_array_equal(xb[7, 3], exp.clean_x[703])
    xb3, yb3 = exp.batches(100, limit=3)
    assert xb3.shape[0] == 3
    np.testing.assert_array_equal(yb3.reshape(-1), exp.clean_y[:300])


def test_limit_eval_measures_the_first_n_images_of_each_set(exp):
    """`--eval-limit N`: accuracy on the first N accuracy images, ASR on the first N triggered
    images, computed here by hand from the full sets' predictions; the clean set is untouched."""
    import jax.numpy as jnp

    small = exp.limit_eval(300)
    assert exp.limit_eval(0) is exp
    np.testing.assert_array_equal(small.clean_x, exp.clean_x)
    assert small.acc_x.shape[0] == small.asr_x.shape[0] == small.asr_y.shape[0] == 300
    predict = lambda x: np.asarray(jnp.argmax(exp.model.apply(exp.variables, x), -1))
    acc = float(np.mean(predict(exp.acc_x[:300]) == exp.acc_y[:300]))
    hit = predict(exp.asr_x[:300]) == exp.asr_t[:300]
    m = small.evaluate(exp.variables)
    assert m["clean_acc"] == pytest.approx(acc, abs=1e-6)
    assert m["asr_all"] == pytest.approx(float(np.mean(hit)), abs=1e-6)
    keep = exp.clean_y[:300] != exp.target
    assert m["asr_nontarget"] == pytest.approx(float(np.mean(hit[keep])), abs=1e-6)


def test_file_trigger_and_n_clean():
    e = experiment.load(shared_path(CKPT), data_dir=shared_path(CIFAR_DIR), download=False,
                        attack="trojan_wm", trigger_dir=shared_path(TRIGGERS), n_clean=1000)
    assert e.clean_x.shape[0] == 1000 and e.acc_x.shape[0] == 9000
    # the original rule (../shared/README.md): clip(x + png / 255, 0, 1)
    png = np.asarray(Image.open(shared_path(TRIGGERS) / "trojan_wm.png").convert("RGB"), np.float32) / 255.0
    np.testing.assert_allclose(e.asr_x[:5], np.clip(e.clean_x[:5] + png, 0.0, 1.0), atol=1e-6)
    assert np.any(png > 0)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset 'mnist'; choose one of cifar10, gtsrb"):
        experiment.load(shared_path(CKPT), dataset="mnist")
    with pytest.raises(data.DataError, match="GTSRB needs a data directory"):
        experiment.load(shared_path(CKPT), dataset="gtsrb")
    with pytest.raises(data.DataError, match="nodata"):
        experiment.load(shared_path(CKPT), data_dir=tmp_path / "nodata", download=False)
    with pytest.raises(attacks.AttackError, match="needs its trigger file: pass --trigger-dir"):
        experiment.load(shared_path(CKPT), data_dir=shared_path(CIFAR_DIR), download=False, attack="trojan_sq")


def test_attack_options_reach_the_trigger():
    """experiment.load(attack_options=...) builds the ASR set with them: SIG at delta 0 leaves the
    images as they are; at 0.25 the sine adds exactly 0.25 where it peaks (column 12)."""
    kw = dict(data_dir=shared_path(CIFAR_DIR), download=False, attack="sig", target=8, n_clean=100)
    flat = experiment.load(shared_path(CKPT), attack_options={"delta": 0.0}, **kw)
    np.testing.assert_array_equal(flat.asr_x, flat.clean_x)
    strong = experiment.load(shared_path(CKPT), attack_options={"delta": 0.25}, **kw)
    diff = strong.asr_x - strong.clean_x
    room = strong.clean_x[:, :, 12] <= 0.75                                  # not clipped at 1
    np.testing.assert_allclose(diff[:, :, 12][room], 0.25, atol=1e-6)
