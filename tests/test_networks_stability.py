"""Stability of trained networks: static layers at their fixed points, the RNN cell along a sequence."""

import numpy as np
import pytest
import torch
from helpers import perturbed_layer, sample_of

from organics.circuit import Circuit
from organics.networks import ORGaNICsRNN
from organics.networks.baselines import MLP
from organics.networks.stability import (
    cell_trajectory,
    frozen_circuit,
    layer_stability,
    stability_along_sequence,
)
from organics.networks.static import StaticORGaNICs
from organics.stability import jacobian, spectral_abscissa


def test_layer_stability_is_the_spectral_abscissa_at_each_samples_fixed_point():
    layer = perturbed_layer()
    model = StaticORGaNICs(12, hidden_sizes=(6,)).double()
    model.layers[0] = layer
    x = torch.rand(4, 12, dtype=torch.float64)
    (report,) = layer_stability(model, x, iterations=200)
    state = layer.fixed_point(x, iterations=200)
    for i in range(4):
        circuit = sample_of(state, i)
        y, a = state.y[i].detach().numpy(), state.a[i].detach().numpy()
        assert report.max_real[i].item() == pytest.approx(spectral_abscissa(jacobian(circuit, y, a)), abs=1e-12)


def test_layer_stability_on_a_model_reports_stable_fixed_points():
    torch.manual_seed(3)
    model = StaticORGaNICs(20, hidden_sizes=(8, 6))
    with torch.no_grad():
        for layer in model.layers:
            layer.V_r.add_(0.3 * torch.randn_like(layer.V_r))
    report = layer_stability(model, torch.rand(16, 20))
    assert len(report) == 2
    for layer_report in report:
        assert layer_report.max_real.shape == (16,)
        assert (layer_report.absolute_residual < 1e-9).all()
        assert (layer_report.max_real < 0).all()
    with pytest.raises(ValueError, match="fixed_points"):
        layer_stability(MLP(20), torch.rand(2, 20))


@pytest.fixture(params=[False, True], ids=["main", "rectified"])
def model(request):
    torch.manual_seed(0)
    return ORGaNICsRNN(1, 6, 10, rectified=request.param, impl="loop").double()


def test_trajectory_matches_the_classifier(model):
    x = torch.rand(3, 20, 1, dtype=torch.float64)
    traj = cell_trajectory(model.cell, x)
    _, ref = model.run(x, return_trajectory=True)
    torch.testing.assert_close(traj.y, ref.y)
    torch.testing.assert_close(traj.a, ref.a)
    assert traj.b.shape == traj.b0.shape == (3, 20, 6)


def euler_step_jacobian(cell, y, a, b, b0):
    """Oracle: Jacobian d(y', a')/d(y, a) of one step of the cell at one state, by autograd (gains frozen)."""
    n = cell.hidden_size
    x = torch.zeros(1, cell.input_size, dtype=torch.float64)

    def step(s):
        new = cell(x, (s[None, :n], s[None, n:], b[None], b0[None]))
        return torch.cat([new.y[0], new.a[0]])

    return torch.autograd.functional.jacobian(step, torch.cat([y, a])).numpy()


def test_euler_step_jacobian_is_identity_plus_the_frozen_circuits_jacobian(model):
    """The cell's Euler step with frozen gains is s + J s in steps: tau = 1/dt is the right time unit."""
    traj = cell_trajectory(model.cell, torch.rand(1, 30, 1, dtype=torch.float64))
    y, a, b, b0 = (v[0, 29] for v in traj)
    J = jacobian(frozen_circuit(model.cell, b, b0), y, a).numpy()
    np.testing.assert_allclose(euler_step_jacobian(model.cell, y, a, b, b0), np.eye(12) + J, atol=1e-12)


def test_frozen_circuit_is_the_numpy_circuit_with_time_in_steps(model):
    cell = model.cell
    b, b0 = torch.full((6,), 0.3, dtype=torch.float64), torch.full((6,), 0.7, dtype=torch.float64)
    p = frozen_circuit(cell, b, b0)
    dt_y, dt_a, _, _ = cell.step_sizes()
    circuit = Circuit(
        W=p.W.numpy(), b=0.3, b0=0.7, sigma=p.sigma.numpy(), tau_y=1 / dt_y.detach().numpy(),
        tau_a=1 / dt_a.detach().numpy(), W_r=p.W_r.numpy(), rectified=cell.rectified,
    )  # fmt: skip
    y, a = np.linspace(-1, 1, 6), np.linspace(0.1, 1, 6)
    np.testing.assert_allclose(jacobian(p, torch.tensor(y), torch.tensor(a)).numpy(), jacobian(circuit, y, a))


def test_stability_along_sequence_steps_shapes_and_values(model):
    x = torch.rand(2, 10, 1, dtype=torch.float64)
    result = stability_along_sequence(model.cell, x, every=4)
    np.testing.assert_array_equal(result.steps, [3, 7, 9])
    assert result.max_real.shape == (2, 3) and np.all(np.isfinite(result.max_real))
    traj = cell_trajectory(model.cell, x)
    for i in range(2):
        for k, t in enumerate(result.steps):
            p = frozen_circuit(model.cell, traj.b[i, t], traj.b0[i, t])
            expected = spectral_abscissa(jacobian(p, traj.y[i, t], traj.a[i, t])).item()
            assert result.max_real[i, k] == pytest.approx(expected, abs=1e-12)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="every must be an integer"):
            stability_along_sequence(model.cell, x, every=bad)
