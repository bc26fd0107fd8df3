"""Static ORGaNICs layers, the model registry and the Jacobian stability monitor."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from organics.layers import (
    MLP,
    CircuitLayer,
    StaticORGaNICs,
    constrain_spectral_norm,
    iterate_steady_state,
    steady_state_residual,
)
from organics.model import Circuit, dn_steady_state
from organics.monitor import circuit_jacobian, largest_real_part, layer_stability
from organics.registry import build_model, register_model
from organics.solver import iterate_fixed_point


def _perturbed_layer(in_features: int = 12, n: int = 6, scale: float = 0.3, seed: int = 0) -> CircuitLayer:
    """A float64 layer with a learned, non-trivial W_r and spread-out parameters."""
    torch.manual_seed(seed)
    layer = CircuitLayer(in_features, n).double()
    with torch.no_grad():
        layer.V_r.add_(scale * torch.randn(n, n, dtype=torch.float64))
        layer.log_W.add_(0.5 * torch.randn(n, n, dtype=torch.float64))
        layer.log_sigma.add_(0.3 * torch.randn(n, dtype=torch.float64))
        layer.b0_logit.add_(torch.randn(n, dtype=torch.float64))
    return layer


def _sample_circuit(state, i: int, tau: float = 2.0) -> Circuit:
    p = state.p
    return Circuit(
        W=p.W.detach().numpy(),
        b=p.b[i].detach().numpy(),
        b0=p.b0.detach().numpy(),
        sigma=p.sigma.detach().numpy(),
        tau_y=tau,
        tau_a=tau,
        W_r=p.W_r.detach().numpy(),
    )


def test_identity_layer_output_is_the_dn_steady_state():
    torch.manual_seed(1)
    layer = CircuitLayer(10, 5, recurrence="identity").double()
    x = torch.rand(4, 10, dtype=torch.float64)
    with torch.no_grad():
        state = layer.fixed_point(x)
    y_s, a_s = dn_steady_state(state.z, state.p.b, state.p.b0, state.p.sigma, state.p.W)
    torch.testing.assert_close(layer(x).detach(), y_s, rtol=0, atol=0)
    torch.testing.assert_close(state.a, a_s, rtol=0, atol=0)
    assert steady_state_residual(state).max() < 1e-12
    np.testing.assert_allclose(_sample_circuit(state, 2).steady_state(state.z[2].numpy())[0], y_s[2].numpy())


def test_drive_is_normalised_and_gains_in_range():
    layer = CircuitLayer(10, 5)
    z, p = layer.circuit(torch.rand(8, 10) * 5)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(8))
    assert ((p.b > 0) & (p.b <= 1)).all() and ((p.b0 > 0) & (p.b0 < 1)).all()
    assert (p.sigma > 0).all() and (p.W >= 0).all()


def test_learned_recurrence_reaches_the_fixed_point_of_algorithm_1():
    layer = _perturbed_layer()
    x = torch.rand(5, 12, dtype=torch.float64)
    assert not torch.allclose(layer.W_r, torch.eye(6, dtype=torch.float64))
    with torch.no_grad():
        state = layer.fixed_point(x, iterations=200)
    assert steady_state_residual(state).max() < 1e-9
    for i in range(5):
        reference = iterate_fixed_point(_sample_circuit(state, i), state.z[i].numpy(), tol=1e-12)
        np.testing.assert_allclose(state.y[i].numpy(), reference.y, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(state.a[i].numpy(), reference.a, rtol=1e-7, atol=1e-12)


def test_iterate_steady_state_starts_at_dn_and_validates():
    layer = _perturbed_layer()
    z, p = layer.circuit(torch.rand(3, 12, dtype=torch.float64))
    y0, a0 = iterate_steady_state(z, p, 0)
    torch.testing.assert_close(y0, dn_steady_state(z, p.b, p.b0, p.sigma, p.W)[0])
    with pytest.raises(ValueError, match="iterations"):
        iterate_steady_state(z, p, -1)
    with pytest.raises(ValueError, match="rectified"):
        iterate_steady_state(z, p._replace(rectified=True), 3)


def test_gradient_through_algorithm_1_is_correct():
    layer = _perturbed_layer(in_features=4, n=3, scale=0.2)
    layer.iterations = 4
    x = torch.rand(2, 4, dtype=torch.float64)
    names = ("V_r", "log_W", "log_sigma", "W_zx.weight")
    params = dict(layer.named_parameters())

    def output(*values):
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    inputs = [params[k].detach().clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(output, inputs)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.floats(0.01, 100.0), st.integers(0, 10_000))
def test_recurrent_weights_have_spectral_norm_at_most_one(n, scale, seed):
    V = scale * torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    W_r = constrain_spectral_norm(V)
    sigma_max = torch.linalg.matrix_norm(W_r, ord=2)
    assert sigma_max <= 1 + 1e-12
    if torch.linalg.matrix_norm(V, ord=2) <= 1:
        torch.testing.assert_close(W_r, V)
    else:
        assert sigma_max == pytest.approx(1.0, abs=1e-12)


def test_layer_constrains_its_trained_recurrence():
    layer = _perturbed_layer(scale=5.0)
    assert torch.linalg.matrix_norm(layer.V_r, ord=2) > 1
    assert torch.linalg.matrix_norm(layer.W_r, ord=2) <= 1 + 1e-12


def _analytic_jacobian(y, a, p):
    """The Jacobian of the main model, block by block (a > 0)."""
    sa = np.sqrt(a)
    n = len(y)
    J = np.zeros((2 * n, 2 * n))
    J[:n, :n] = (-np.eye(n) + (1 - sa)[:, None] * p.W_r) / p.tau_y[:, None]
    J[:n, n:] = np.diag(-(p.W_r @ y) / (2 * sa) / p.tau_y)
    J[n:, :n] = p.W * (2 * a * y)[None, :] / p.tau_a[:, None]
    J[n:, n:] = (-np.eye(n) + p.W * (y**2)[None, :]) / p.tau_a[:, None]
    return J


def test_monitor_jacobian_matches_the_analytic_formula_and_numpy_eigenvalues():
    layer = _perturbed_layer()
    state = layer.fixed_point(torch.rand(3, 12, dtype=torch.float64), iterations=100)
    J = circuit_jacobian(state)
    assert J.shape == (3, 12, 12)
    for i in range(3):
        circuit = _sample_circuit(state, i)
        expected = _analytic_jacobian(state.y[i].detach().numpy(), state.a[i].detach().numpy(), circuit)
        np.testing.assert_allclose(J[i].detach().numpy(), expected, rtol=1e-10, atol=1e-12)
        assert largest_real_part(J[i : i + 1]).item() == pytest.approx(
            np.linalg.eigvals(expected).real.max(), abs=1e-10
        )


def test_monitor_on_a_model_reports_stable_fixed_points():
    torch.manual_seed(3)
    model = StaticORGaNICs(20, hidden=(8, 6))
    with torch.no_grad():
        for layer in model.layers:
            layer.V_r.add_(0.3 * torch.randn_like(layer.V_r))
    report = layer_stability(model, torch.rand(16, 20))
    assert len(report) == 2
    for layer_report in report:
        assert layer_report.max_real.shape == (16,)
        assert (layer_report.residual < 1e-9).all()
        assert (layer_report.max_real < 0).all()
    with pytest.raises(ValueError, match="fixed_points"):
        layer_stability(MLP(20), torch.rand(2, 20))


def test_static_models_shapes_and_parameter_counts():
    organics = build_model("organics2", in_features=784)
    mlp = build_model("mlp", in_features=784)
    assert organics(torch.rand(3, 784)).shape == (3, 10) and mlp(torch.rand(3, 784)).shape == (3, 10)
    n_org = sum(p.numel() for p in organics.parameters())
    n_mlp = sum(p.numel() for p in mlp.parameters())
    assert abs(n_org - n_mlp) / n_org < 0.05


def test_registry_errors_and_paths():
    with pytest.raises(ValueError, match="not registered"):
        build_model("no_such_model", in_features=4)
    with pytest.raises(ValueError, match="importable"):
        build_model("organics.layers:NoSuchFactory", in_features=4)
    with pytest.raises(ValueError, match="name"):
        register_model("bad:name", MLP)
    assert isinstance(build_model("organics.layers:MLP", in_features=4, hidden=(3,)), MLP)
    with pytest.raises(ValueError, match="recurrence"):
        CircuitLayer(4, 3, recurrence="random")
