"""I-BAU pieces on a tiny linear-softmax model, against dense-matrix computations."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ibau_jax.defenses import ibau

SHAPE = (4, 4, 3)  # image shape: δ has 48 entries, small enough for dense Hessians
D = int(np.prod(SHAPE))


def logits_fn(params, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w"]) @ params["v"] + params["b"]


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(D, 8)) * 0.5, jnp.float32),
              "v": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
              "b": jnp.zeros((5,), jnp.float32)}
    xb = jnp.asarray(rng.random((3, 10) + SHAPE), jnp.float32)
    yb = jnp.asarray(rng.integers(0, 5, (3, 10)), jnp.int32)
    return params, xb, yb


def _flat(t):
    return jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])


def test_project_l2():
    d = jnp.full((1,) + SHAPE, 3.0)
    n = float(jnp.linalg.norm(d))
    np.testing.assert_allclose(float(jnp.linalg.norm(ibau.project_l2(d, 1.0))), 1.0, rtol=1e-6)
    np.testing.assert_allclose(ibau.project_l2(d, 2 * n), d)
    assert ibau.project_l2(d, None) is d


def test_random_masks_count_and_seed():
    cfg = ibau.IBAUConfig(batch_size=100, portion=0.05)
    m = ibau.random_masks(jax.random.PRNGKey(0), 7, cfg)
    assert m.shape == (7, 100) and np.all(np.asarray(m.sum(1)) == 5)
    np.testing.assert_array_equal(m, ibau.random_masks(jax.random.PRNGKey(0), 7, cfg))
    assert ibau.IBAUConfig().n_perturbed == 1  # int(0.01 * 100), as the original


def test_python_masks_follow_the_original_random_stream():
    # The original calls random.sample(list(np.arange(100)), int(100 * 0.01)) once per outer
    # step, after random.seed(seed), with no other use of `random` in between; 2 rounds of 50.
    import random
    random.seed(3)
    expected = [random.sample(list(np.arange(100)), 1)[0] for _ in range(2 * 50)]
    m = ibau.seed_masks(3, 2, 50, ibau.IBAUConfig.faithful())
    assert m.shape == (2, 50, 100) and m.dtype == np.float32 and np.all(m.sum(-1) == 1)
    assert m.reshape(100, 100).argmax(-1).tolist() == [int(i) for i in expected]
    assert not np.array_equal(m, ibau.seed_masks(4, 2, 50, ibau.IBAUConfig.faithful()))
    # several images per batch: distinct positions, the exact count
    m5 = ibau.seed_masks(0, 1, 7, ibau.IBAUConfig(batch_size=100, portion=0.05))
    assert np.all(m5.sum(-1) == 5) and set(np.unique(m5)) == {0.0, 1.0}


def test_jax_seed_masks_are_split_keys():
    cfg = ibau.IBAUConfig.faithful()
    m = ibau.seed_masks(2, 2, 5, cfg, rng="jax")
    key = jax.random.PRNGKey(2)
    for r in range(2):
        key, sub = jax.random.split(key)
        np.testing.assert_array_equal(m[r], np.asarray(ibau.random_masks(sub, 5, cfg)))
    with pytest.raises(ValueError, match="unknown mask rng 'numpy'; choose one of python, jax"):
        ibau.seed_masks(0, 1, 5, cfg, rng="numpy")


def test_search_is_sgd_on_predicted_labels(problem):
    params, xb, yb = problem
    cfg = ibau.IBAUConfig(batch_size=10, search_lr=0.7, search_reg=0.05)
    delta = ibau.search_perturbation(logits_fn, params, xb, yb, cfg)
    d = jnp.zeros((1,) + SHAPE)
    for x in xb:  # hand-written: one SGD step per batch on -CE(f(x+d), argmax f(x)) + reg |d|^2
        lab = jnp.argmax(logits_fn(params, x), -1)
        f = lambda d: -jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x + d), lab)) \
            + 0.05 * jnp.sum(d ** 2)
        d = d - 0.7 * jax.grad(f)(d)
    np.testing.assert_allclose(delta, d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K", [1, 3, 5])
def test_hypergradient_equals_dense_k_step_formula(problem, K):
    params, xb, yb = problem
    cfg = ibau.IBAUConfig(batch_size=10, K=K, fp_step=0.3)
    delta = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (1,) + SHAPE)
    mask = jnp.zeros(10).at[2].set(1.0)
    x_in, y_in, x_out, y_out = xb[0], yb[0], xb[1], yb[1]
    _, g = ibau.hypergradient(logits_fn, params, delta, x_in, y_in, x_out, y_out, mask, cfg)

    # Independent: dense Jacobians of Φ, explicit K-step recursion.
    phi = lambda d, p: ibau.fixed_point_map(logits_fn, d, p, x_in, y_in, cfg.fp_step, cfg.inner_reg)
    lout = lambda d, p: ibau.outer_loss(logits_fn, d, p, x_out, y_out, mask)
    J = jax.jacobian(phi, 0)(delta, params).reshape(D, D)
    Jt = jax.jacobian(phi, 1)(delta, params)
    Jtheta = jnp.concatenate([a.reshape(D, -1) for a in jax.tree.leaves(Jt)], 1)
    gd, gt = jax.grad(lout, (0, 1))(delta, params)
    v = jnp.zeros(D)
    for _ in range(K):
        v = J.T @ v + gd.ravel()
    expect = _flat(gt) + Jtheta.T @ v
    np.testing.assert_allclose(_flat(g), expect, rtol=2e-4, atol=2e-6)
    if K > 1:  # the implicit term matters: differs from the plain outer gradient
        assert float(jnp.linalg.norm(expect - _flat(gt))) > 1e-3 * float(jnp.linalg.norm(expect))


def test_dense_solver_gives_exact_implicit_gradient(problem):
    params, xb, yb = problem
    cfg = ibau.IBAUConfig(batch_size=10, solver="dense")
    delta = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (1,) + SHAPE)
    mask = jnp.ones(10)
    _, g = ibau.hypergradient(logits_fn, params, delta, xb[0], yb[0], xb[1], yb[1], mask, cfg)
    lin = lambda d, p: ibau.inner_loss(logits_fn, d, p, xb[0], yb[0], cfg.inner_reg)
    H = jax.hessian(lin, 0)(delta, params).reshape(D, D)
    Hx = jax.jacobian(jax.grad(lin, 0), 1)(delta, params)
    Hdt = jnp.concatenate([a.reshape(D, -1) for a in jax.tree.leaves(Hx)], 1)
    lout = lambda d, p: ibau.outer_loss(logits_fn, d, p, xb[1], yb[1], mask)
    gd, gt = jax.grad(lout, (0, 1))(delta, params)
    expect = _flat(gt) - Hdt.T @ jnp.linalg.solve(H, gd.ravel())
    np.testing.assert_allclose(_flat(g), expect, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("inner_batch", ["first", "current"])
def test_round_equals_python_loop(problem, inner_batch):
    params, xb, yb = problem
    cfg = ibau.IBAUConfig(batch_size=10, radius=1.0, inner_batch=inner_batch, outer_lr=1e-2)
    masks = ibau.random_masks(jax.random.PRNGKey(3), 3, cfg)
    tx = cfg.outer_tx()
    out = jax.jit(lambda p, s: ibau.unlearn_round(logits_fn, cfg, p, s, xb, yb, masks))(params, tx.init(params))
    delta = ibau.project_l2(ibau.search_perturbation(logits_fn, params, xb, yb, cfg), 1.0)
    p, s = params, tx.init(params)
    for b in range(3):
        xi, yi = (xb[0], yb[0]) if inner_batch == "first" else (xb[b], yb[b])
        p, s, _, _ = ibau.outer_step(logits_fn, cfg, p, s, delta, xi, yi, xb[b], yb[b], masks[b])
    np.testing.assert_allclose(out.delta, delta, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(out.params["w"], params["w"])


def test_config_validation():
    with pytest.raises(ValueError, match="unknown solver 'lu'"):
        ibau.IBAUConfig(solver="lu")
    with pytest.raises(ValueError, match="K must be an integer >= 1"):
        ibau.IBAUConfig(K=0)
    with pytest.raises(ValueError, match="inner_batch"):
        ibau.IBAUConfig(inner_batch="random")
    assert ibau.IBAUConfig.defense_py().radius is None
    assert ibau.IBAUConfig.faithful().radius == 10.0


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["normal_cg", "gmres", "bicgstab"])
def test_krylov_solvers_on_small_vgg_match_dense(solver):
    # The real model's convolutions are custom_vjp (ibau_jax.conv): the Krylov solvers must
    # not need jax.linear_transpose there (jax.scipy's / jaxopt's versions did and failed).
    from ibau_jax import models
    with jax.enable_x64(True):
        model = models.SmallVGG(num_classes=5, widths=(4, 4, 4))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.random((2, 4, 8, 8, 3)), jnp.float64)
        y = jnp.asarray(rng.integers(0, 5, (2, 4)), jnp.int32)
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                 model.init(jax.random.PRNGKey(0), x[0]))
        params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
        fn = lambda p, xx: model.apply({"params": p, **rest}, xx)
        delta = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 3), jnp.float64)
        mask = jnp.asarray([0.0, 1.0, 0.0, 1.0])

        def hg(cfg):
            return jax.jit(lambda p: ibau.hypergradient(fn, p, delta, x[0], y[0], x[1], y[1], mask, cfg))(params)[1]

        ref = hg(ibau.IBAUConfig(batch_size=4, solver="dense"))
        g = hg(ibau.IBAUConfig(batch_size=4, solver=solver, solver_tol=1e-12, solver_maxiter=3000))
        one_step = hg(ibau.IBAUConfig(batch_size=4, solver="neumann", K=1))
        err = float(jnp.linalg.norm(_flat(g) - _flat(ref)) / jnp.linalg.norm(_flat(ref)))
        assert err <= 1e-6, (solver, err)
        # an inexact solve is visibly wrong here, so the comparison means something
        assert float(jnp.linalg.norm(_flat(one_step) - _flat(ref))) > 1e-2 * float(jnp.linalg.norm(_flat(ref)))


# ----------------------------------------------------------------------------- the defense

def _tiny_vgg_problem():
    from ibau_jax import models
    from ibau_jax.defenses import CleanSet

    model = models.SmallVGG(num_classes=10, widths=(4, 4, 8))
    variables = jax.device_get(models.init_variables(model, seed=0, image_shape=(8, 8, 3)))
    rng = np.random.default_rng(0)
    clean = CleanSet(rng.random((26, 8, 8, 3), dtype=np.float32), rng.integers(0, 10, 26), 10)
    return model, variables, clean


@pytest.mark.slow
def test_defense_run_equals_round_function_and_reports():
    """IBAU.run (the library loop) equals two calls of make_round with seed_masks of the key's seed."""
    model, variables, clean = _tiny_vgg_problem()
    cfg = ibau.IBAUConfig(batch_size=6, K=2, portion=0.5, outer_lr=1e-2, rounds=2)
    seen = []
    res = ibau.IBAU(cfg).run(model, variables, clean, jax.random.PRNGKey(7),
                             callback=lambda r, v, rec: seen.append(r) or {"extra": r * 10})
    assert seen == [1, 2]
    assert [h["round"] for h in res.history] == [1, 2] and res.history[1]["extra"] == 20
    assert res.diagnostics["num_batches"] == 4 and res.diagnostics["unused_clean_images"] == 2
    assert res.compile_seconds > 0 and res.seconds > 0
    xb, yb = clean.x[:24].reshape(4, 6, 8, 8, 3), clean.y[:24].reshape(4, 6)
    masks = ibau.seed_masks(7, 2, 4, cfg)
    params, bs = variables["params"], variables["batch_stats"]
    opt = cfg.outer_tx().init(params)
    fn = ibau.make_round(model, cfg)
    for r in range(2):
        out = fn(params, bs, opt, xb, yb, masks[r])
        params, opt = out.params, out.opt_state
    for a, b in zip(jax.tree.leaves(res.variables["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(res.history[1]["delta_norm"], float(np.linalg.norm(out.delta)), rtol=1e-6)
    np.testing.assert_array_equal(res.artifacts["delta"], np.asarray(out.delta))


@pytest.mark.slow
def test_padded_round_equals_unpadded():
    """Zero-padded batches with weights (what a mesh whose size does not divide the batch gets)
    give the unpadded round: padding never enters a mean."""
    model, variables, clean = _tiny_vgg_problem()
    cfg = ibau.IBAUConfig(batch_size=6, K=2, portion=0.5, outer_lr=1e-2, inner_batch="current")
    xb, yb, wb, _ = ibau.prepare_batches(clean.x, clean.y, cfg)
    assert wb is None
    masks = ibau.seed_masks(3, 1, xb.shape[0], cfg)[0]
    params, bs = variables["params"], variables["batch_stats"]
    ref = ibau.make_round(model, cfg)(params, bs, cfg.outer_tx().init(params), xb, yb, masks)
    from ibau_jax import sharding
    size = 8
    xp, yp = sharding.pad_examples(xb, 1, size), sharding.pad_examples(yb, 1, size)
    # garbage in the padding must not matter
    xp[:, 6:] = np.random.default_rng(1).random(xp[:, 6:].shape)
    yp[:, 6:] = 3
    mp = sharding.pad_examples(masks, 1, size)
    wb = sharding.example_weights(6, size, (xb.shape[0],))
    got = ibau.make_round(model, cfg, padded=True)(params, bs, cfg.outer_tx().init(params), xp, yp, mp, wb)
    assert float(np.linalg.norm(_flat(got.params) - _flat(params))) > 1e-4
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got.delta, ref.delta, rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_solver_info_reports_residuals():
    model, variables, clean = _tiny_vgg_problem()
    res = ibau.IBAU(ibau.IBAUConfig(batch_size=6, K=2, rounds=1, portion=0.5, solver="gmres", solver_info=True)).run(
        model, variables, clean, jax.random.PRNGKey(0))
    h = res.history[0]
    assert 0 < h["solver_max_rel_residual"] < 0.1 and h["solver_mean_iterations"] >= 1  # float32 GMRES, maxiter 100
    assert h["solver_diverged"] == 0


def test_defense_errors():
    from ibau_jax.defenses import CleanSet
    from ibau_jax.errors import ConfigError
    model, variables, clean = _tiny_vgg_problem()
    small = CleanSet(clean.x[:4], clean.y[:4], 10)
    with pytest.raises(ConfigError, match="fewer than one I-BAU batch of 6"):
        ibau.IBAU(ibau.IBAUConfig(batch_size=6)).run(model, variables, small, jax.random.PRNGKey(0))
    for bad, msg in (({"outer_lr": float("nan")}, "outer_lr must be finite"), ({"radius": -1.0}, "radius must be > 0"),
                     ({"rounds": 0}, "rounds must be an integer >= 1"), ({"portion": 2.0}, r"portion must be in \[0, 1\]"),
                     ({"max_batches": -4}, "max_batches must be an integer >= 0")):
        with pytest.raises(ConfigError, match=msg):
            ibau.IBAUConfig(**bad)
