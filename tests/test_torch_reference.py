"""Checks of the independent PyTorch I-BAU reference (experiments/torch_ibau.py).

The hypergradient is checked against dense-matrix computations built with torch.func
(explicit Jacobians / Hessians of Φ and of the losses, written here with a hand-rolled
cross-entropy), on a tiny float64 conv net with 8×8 inputs.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

# torch.func transforms trigger torch's own torch.jit.script deprecation notice.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import torch_ibau as ti  # noqa: E402
from conftest import CIFAR_DIR, CKPT, shared_path, shared_root  # noqa: E402


# ----------------------------------------------------------------------------
# Shared data
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Path:
    shared_path(CIFAR_DIR + "/test.npz")
    shared_path(CKPT)
    return shared_root()


@pytest.mark.slow
def test_checkpoint_reference_accuracy_and_asr(shared):
    model = ti.load_small_vgg(shared / "ibau-original" / "checkpoints" / "badnets_8_02_ckpt.pth")
    data = np.load(shared / "datasets" / "cifar10" / "test.npz")
    x = data["x"].astype(np.float32) / 255.0
    y = data["y"]
    acc = ti.evaluate(model, x[5000:], y[5000:])
    asr = ti.evaluate(model, ti.badnets(x[:5000]), np.full(5000, 8))
    assert abs(acc - 0.8494) <= 4e-4, acc
    assert abs(asr - 0.9764) <= 4e-4, asr


def test_badnets_and_projection():
    x = np.zeros((2, 32, 32, 3), np.float32)
    t = ti.badnets(x)
    assert x.sum() == 0  # input untouched
    assert t.sum() == 2 * 16 * 3 and t[:, 27:31, 27:31, :].min() == 1.0
    d = np.full((1, 32, 32, 3), 1.0, np.float32)  # norm sqrt(3072) ≈ 55.4
    p = ti.project_l2(d, 10.0)
    assert np.isclose(np.linalg.norm(p), 10.0, rtol=1e-6)
    small = d * 0.1  # norm ≈ 5.5 < 10: unchanged
    np.testing.assert_array_equal(ti.project_l2(small, 10.0), small)


def test_small_vgg_layout():
    names = list(ti.small_vgg().state_dict())
    for i in (0, 1, 3, 4, 8, 9, 11, 12, 16, 17, 19, 20):
        assert f"features.{i}.weight" in names
    assert "features.1.running_mean" in names and "classifier.weight" in names
    out = ti.logits(ti.small_vgg(), np.zeros((2, 32, 32, 3), np.float32))
    assert out.shape == (2, 10)


# ----------------------------------------------------------------------------
# Tiny float64 model and the dense reference
# ----------------------------------------------------------------------------


class Tiny(nn.Module):
    """NCHW (N, 3, 8, 8) -> (N, 3); same layer types as the small VGG."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ELU(),
                                      nn.MaxPool2d(2, 2), nn.Dropout(0.3))
        self.classifier = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    m = Tiny().double()
    with torch.no_grad():
        bn = m.features[1]
        bn.running_mean.copy_(torch.randn(4) * 0.2)
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(1 + 0.3 * torch.randn(4))
        bn.bias.copy_(0.3 * torch.randn(4))
        m.features[0].weight.mul_(2.0)  # make the net less linear
    return m.eval()


def tiny_data(seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        delta=0.3 * rng.standard_normal((1, 8, 8, 3)),
        x_outer=rng.uniform(size=(6, 8, 8, 3)), y_outer=rng.integers(0, 3, 6),
        perturbed_idx=np.array([1, 4]),
        x_inner=rng.uniform(size=(5, 8, 8, 3)), y_inner=rng.integers(0, 3, 5),
    )


class Dense:
    """Flat functional view of a model: losses as functions of (δ flat NCHW, θ flat)."""

    def __init__(self, model, data, reg):
        self.model, self.reg = model, reg
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.buffers = {n: b for n, b in model.named_buffers()}
        t = lambda a: torch.as_tensor(a, dtype=torch.float64).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        self.d = t(data["delta"]).reshape(-1)
        self.xo, self.xi = t(data["x_outer"]), t(data["x_inner"])
        self.yo, self.yi = torch.as_tensor(data["y_outer"]), torch.as_tensor(data["y_inner"])
        self.m = torch.zeros(len(self.xo), dtype=torch.float64)
        self.m[torch.as_tensor(data["perturbed_idx"])] = 1.0

    def f(self, theta, x):
        params, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(np.prod(s))
            params[n] = theta[i:i + k].reshape(s)
            i += k
        return torch.func.functional_call(self.model, {**params, **self.buffers}, (x,))

    @staticmethod
    def ce(z, y):  # mean cross-entropy, written out
        logp = z - torch.logsumexp(z, dim=1, keepdim=True)
        return -logp[torch.arange(len(y)), y].mean()

    def L_in(self, d, theta):
        return -self.ce(self.f(theta, self.xi + d.reshape(1, 3, 8, 8)), self.yi) + self.reg * (d * d).sum()

    def L_out(self, d, theta):
        x = self.xo + self.m.reshape(-1, 1, 1, 1) * d.reshape(1, 3, 8, 8)
        return self.ce(self.f(theta, x), self.yo)

    def phi(self, d, theta, eta):
        return d - eta * torch.func.grad(self.L_in, argnums=0)(d, theta)

    def outer_grads(self):
        return torch.func.grad(self.L_out, argnums=(0, 1))(self.d, self.theta)

    def k_step(self, K, eta):
        """g_θ + J_θᵀ Σ_{k<K} (J_δᵀ)^k g_δ with dense J_δ = ∂Φ/∂δ, J_θ = ∂Φ/∂θ."""
        J_d, J_t = torch.func.jacrev(lambda d, t: self.phi(d, t, eta), argnums=(0, 1))(self.d, self.theta)
        g_d, g_t = self.outer_grads()
        v = sum(torch.linalg.matrix_power(J_d.T, k) @ g_d for k in range(K))
        return g_t + J_t.T @ v

    def implicit(self):
        """∇θL − H_θδ H_δδ⁻¹ ∇δL (H = Hessian of L_inner), plus eigenvalues of H_δδ."""
        H_dd = torch.func.hessian(self.L_in, argnums=0)(self.d, self.theta)
        H_dt = torch.func.jacrev(torch.func.grad(self.L_in, argnums=0), argnums=1)(self.d, self.theta)
        g_d, g_t = self.outer_grads()
        return g_t - H_dt.T @ torch.linalg.solve(H_dd, g_d), torch.linalg.eigvalsh(H_dd)

    def flat(self, grads: dict) -> torch.Tensor:
        assert list(grads) == self.names
        return torch.cat([torch.as_tensor(grads[n]).reshape(-1) for n in self.names])


def rel_err(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def run_hypergradient(model, data, K, eta, reg, structure="lean"):
    return ti.hypergradient(model, data["delta"], data["x_outer"], data["y_outer"], data["perturbed_idx"],
                            data["x_inner"], data["y_inner"], K=K, eta=eta, reg=reg, structure=structure)


@pytest.mark.parametrize("structure", ti.STRUCTURES)
@pytest.mark.parametrize("K", [1, 2, 5])
def test_hypergradient_matches_dense_k_step(K, structure):
    model, data = tiny_model(), tiny_data()
    dense = Dense(model, data, reg=1e-3)
    got = run_hypergradient(model, data, K=K, eta=0.1, reg=1e-3, structure=structure)
    assert all(v.dtype == np.float64 for v in got.values())
    want = dense.k_step(K, eta=0.1)
    # the implicit term must matter, or this would only test ∇θ L_outer
    g_t = dense.outer_grads()[1]
    assert rel_err(g_t, want) > 1e-3
    assert rel_err(dense.flat(got), want) <= 1e-8


def test_hypergradient_k_steps_differ():
    """K-step results are not the converged solution: K=1 and K=5 must differ."""
    model, data = tiny_model(), tiny_data()
    a = Dense(model, data, 1e-3).flat(run_hypergradient(model, data, K=1, eta=0.1, reg=1e-3))
    b = Dense(model, data, 1e-3).flat(run_hypergradient(model, data, K=5, eta=0.1, reg=1e-3))
    assert rel_err(a, b) > 1e-4


def test_hypergradient_large_k_approaches_implicit_solution():
    reg, eta, K = 1.0, 0.2, 200
    model, data = tiny_model(), tiny_data()
    dense = Dense(model, data, reg=reg)
    want, eig = dense.implicit()
    assert eig.min() > 0, "inner problem must be strongly convex for the iteration to converge"
    rho = float(torch.max(torch.abs(1 - eta * eig)))
    assert rho ** K < 1e-9, rho
    got = dense.flat(run_hypergradient(model, data, K=K, eta=eta, reg=reg))
    assert rel_err(got, want) <= 1e-6
    # and a short K is measurably off, so the test can tell K apart
    short = dense.flat(run_hypergradient(model, data, K=2, eta=eta, reg=reg))
    assert rel_err(short, want) > 1e-3


def test_hypergradient_does_not_touch_model():
    model, data = tiny_model(), tiny_data()
    before = copy.deepcopy(model.state_dict())
    run_hypergradient(model, data, K=3, eta=0.1, reg=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------
# Perturbation search and a whole round
# ----------------------------------------------------------------------------


def test_perturbation_search_matches_hand_sgd_steps():
    model = tiny_model(1)
    rng = np.random.default_rng(3)
    batches = [rng.uniform(size=(7, 8, 8, 3)) for _ in range(2)]
    lr, reg = 10.0, 0.05
    dense = Dense(model, tiny_data(), reg)

    def loss(d, x, yhat):  # −CE(f(x+δ), ŷ) + reg‖δ‖²
        return -Dense.ce(dense.f(dense.theta, x + d.reshape(1, 3, 8, 8)), yhat) + reg * (d * d).sum()

    # one batch: from δ = 0 the step is +lr ∇CE (the reg gradient is zero at 0)
    got1 = ti.perturbation_search(model, batches[:1], lr=lr, reg=reg)
    d = torch.zeros(3 * 8 * 8, dtype=torch.float64)
    for i, xb in enumerate(batches):
        x = torch.as_tensor(xb).permute(0, 3, 1, 2).contiguous()
        yhat = dense.f(dense.theta, x).argmax(1)
        d = d - lr * torch.func.grad(loss)(d, x, yhat)
        if i == 0:
            np.testing.assert_allclose(got1.transpose(0, 3, 1, 2).reshape(-1), d.numpy(), rtol=1e-10, atol=1e-12)
    got2 = ti.perturbation_search(model, batches, lr=lr, reg=reg)
    assert got2.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(got2.transpose(0, 3, 1, 2).reshape(-1), d.numpy(), rtol=1e-10, atol=1e-12)


def test_original_structure_search_equals_lean_and_clears_parameter_grads():
    model = tiny_model(1)
    rng = np.random.default_rng(4)
    xs = [torch.as_tensor(rng.uniform(size=(7, 3, 8, 8))) for _ in range(3)]
    lean = ti._perturbation_search(model, xs, 10.0, 1e-3)
    orig = ti._perturbation_search_original(model, xs, 10.0, 1e-3)
    assert lean.abs().sum() > 0
    torch.testing.assert_close(orig, lean, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())  # the θ-gradients it computed are dropped


def test_unknown_structure_is_rejected():
    model, data = tiny_model(), tiny_data()
    with pytest.raises(ValueError, match="unknown structure 'fast'.*lean, original"):
        run_hypergradient(model, data, K=2, eta=0.1, reg=1e-3, structure="fast")


@pytest.mark.parametrize("structure", ti.STRUCTURES)
def test_unlearn_round_equals_search_projection_and_adam_steps(structure):
    """Round = search, projection, then Adam steps (numpy Adam) with inner batch 0, true labels.

    Both organisations of the round (``structure``) must give these numbers."""
    model = tiny_model(2)
    rng = np.random.default_rng(5)
    xs = [rng.uniform(size=(6, 8, 8, 3)) for _ in range(3)]
    ys = [rng.integers(0, 3, 6) for _ in range(3)]
    idx = [np.array([i]) for i in (0, 3, 5)]
    radius, lr = 0.5, 1e-3

    ref = copy.deepcopy(model)
    delta = ti.project_l2(ti.perturbation_search(ref, xs, lr=10.0, reg=1e-3), radius)
    assert np.isclose(np.linalg.norm(delta), radius)  # the projection is active here
    m = {n: 0.0 for n, _ in ref.named_parameters()}
    v = dict(m)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, b in enumerate(range(3), start=1):
        g = ti.hypergradient(ref, delta, xs[b], ys[b], idx[b], xs[0], ys[0], K=5, eta=0.1, reg=1e-3)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                m[n] = b1 * m[n] + (1 - b1) * g[n]
                v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
                step = lr * (m[n] / (1 - b1 ** t)) / (np.sqrt(v[n] / (1 - b2 ** t)) + eps)
                p -= torch.as_tensor(step)

    got_delta, timings = ti.unlearn_round(model, xs, ys, idx, K=5, eta=0.1, reg=1e-3, outer_lr=lr, radius=radius,
                                          structure=structure)
    np.testing.assert_allclose(got_delta, delta, rtol=1e-12, atol=1e-14)
    assert timings["search_s"] >= 0 and timings["unlearn_s"] >= 0 and len(timings["step_s"]) == 3
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), dict(ref.named_parameters())[n].detach().numpy(),
                                   rtol=1e-9, atol=1e-12, err_msg=n)
    # the parameters actually moved
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), tiny_model(2).parameters()))
