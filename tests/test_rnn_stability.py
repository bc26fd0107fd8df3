"""Stability of the ORGaNICs RNN cell's circuit along a sequence."""

import numpy as np
import pytest
import torch

from organics.rnn import ORGaNICsRNN
from organics.rnn_stability import (
    cell_trajectory,
    euler_step_jacobian,
    frozen_circuit,
    stability_along_sequence,
)
from organics.stability import jacobian


@pytest.fixture(params=[False, True], ids=["main", "rectified"])
def model(request):
    torch.manual_seed(0)
    return ORGaNICsRNN(1, 6, 10, rectified=request.param, impl="reference").double()


def test_trajectory_matches_the_classifier(model):
    x = torch.rand(3, 20, 1, dtype=torch.float64)
    traj = cell_trajectory(model.cell, x)
    _, ref = model.run(x, return_trajectory=True)
    torch.testing.assert_close(traj.y, ref.y)
    torch.testing.assert_close(traj.a, ref.a)
    assert traj.b.shape == traj.b0.shape == (3, 20, 6)


def test_euler_step_jacobian_is_identity_plus_circuit_jacobian(model):
    """The cell's Euler step with frozen gains is s + J s in steps: tau = 1/dt is the right time unit."""
    traj = cell_trajectory(model.cell, torch.rand(1, 30, 1, dtype=torch.float64))
    t = 29
    y, a, b, b0 = (v[0, t] for v in traj)
    circuit = frozen_circuit(model.cell, b, b0)
    J = jacobian(circuit, y.numpy(), a.numpy())
    np.testing.assert_allclose(euler_step_jacobian(model.cell, y, a, b), np.eye(12) + J, atol=1e-12)


def test_stability_along_sequence_steps_and_shapes(model):
    x = torch.rand(2, 10, 1, dtype=torch.float64)
    result = stability_along_sequence(model.cell, x, every=4)
    np.testing.assert_array_equal(result.steps, [3, 7, 9])
    assert result.max_real.shape == (2, 3)
    assert np.all(np.isfinite(result.max_real))
    with pytest.raises(ValueError, match="every"):
        stability_along_sequence(model.cell, x, every=0)
