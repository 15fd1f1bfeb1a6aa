"""ibau_jax.train: the step learns, augmentation is a crop/flip, checkpoints resume exactly."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import cli, models, train

MODEL = models.SmallVGG(4, widths=(4, 8, 8))  # tiny: compile and steps stay cheap on 2 cores


def _data(n=48, seed=0):
    """A learnable toy problem: the class is which quadrant holds a bright square."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n).astype(np.int32)
    x = rng.uniform(0, 0.2, (n, 32, 32, 3)).astype(np.float32)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 16 * r + 4:16 * r + 12, 16 * q + 4:16 * q + 12] = 1.0
    return x, y


def test_train_step_reduces_loss():
    x, y = _data(32)
    config = train.TrainConfig(epochs=1, batch_size=32, lr=0.05)
    state = train.create_state(MODEL, config, steps_per_epoch=30)
    losses = []
    for i in range(12):
        state, m = train.train_step(state, (x, y), jax.random.PRNGKey(i), crop_pad=0, flip=False)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    # BatchNorm running statistics moved away from their initial values.
    assert not np.allclose(state.batch_stats["bn0"]["mean"], 0.0)


def test_augment_flip_and_crop():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(32, 8, 8, 2)).astype(np.float32))
    out = np.asarray(train.augment(x, jax.random.PRNGKey(0), crop_pad=0, flip=True))
    assert out.shape == x.shape
    xn = np.asarray(x)
    flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, xn)]
    same = [np.array_equal(o, xi) for o, xi in zip(out, xn)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)

    pad = 2
    out = np.asarray(train.augment(x, jax.random.PRNGKey(1), crop_pad=pad, flip=False))
    padded = np.pad(xn, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = []
    for o, p in zip(out, padded):
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if np.array_equal(o, p[i:i + 8, j:j + 8])]
        assert hits, "every output is a window of the zero-padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 3  # offsets really vary


def _run(tmp_path, name, **kw):
    x, y = _data()
    config = train.TrainConfig(epochs=kw.pop("epochs", 2), batch_size=16, lr=kw.pop("lr", 0.05), crop_pad=2)
    return train.train(MODEL, x, y, config, run_dir=tmp_path / name, run_config={"dataset": "toy"},
                       meta={"model": "small_vgg_tiny", "num_classes": 4}, quiet=True, log=lambda s: None, **kw)


def _same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resume_equals_uninterrupted_and_checks_config(tmp_path):
    full, hist_full = _run(tmp_path, "full")
    _, hist_half = _run(tmp_path, "cut", stop_after=1)  # "interrupted" after epoch 1
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["epochs_done"] == 1 and run["config"]["dataset"] == "toy" and run["config"]["epochs"] == 2
    assert len(hist_half) == 1
    resumed, hist_resumed = _run(tmp_path, "cut", resume=True)
    assert _same((full.params, full.batch_stats, full.opt_state),
                 (resumed.params, resumed.batch_stats, resumed.opt_state))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(hist_full) == strip(hist_resumed)

    with pytest.raises(train.RunError, match=r"differs in \['lr'\]"):
        _run(tmp_path, "cut", resume=True, lr=0.1)
    with pytest.raises(train.RunError, match="already holds a run"):
        _run(tmp_path, "cut")


def test_missing_or_corrupt_run_dir(tmp_path, capsys):
    with pytest.raises(train.RunError, match="does not exist"):
        _run(tmp_path, "nowhere", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(train.RunError, match="run.json is missing"):
        train.read_run(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{not json")
    with pytest.raises(train.RunError, match="corrupt"):
        train.read_run(bad)
    # the CLI turns it into one line and exit status 2
    assert cli.main(["unlearn", "--model", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert cli.main(["unlearn", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")]) == 2
    assert "neither an architecture" in capsys.readouterr().err
