"""Jacobian (analytic vs autograd), spectra, and unconditional stability for W_r = I."""

import numpy as np
import pytest
import torch
from helpers import identity_circuits
from hypothesis import given, settings
from hypothesis import strategies as st

from organics.circuit import Circuit
from organics.sampling import sample_circuit
from organics.stability import (
    analyze,
    classify,
    jacobian,
    jacobian_autograd,
    loop_gain,
    spectral_abscissa,
    spectrum,
)


@settings(max_examples=150, deadline=None)
@given(identity_circuits())
def test_dn_fixed_point_is_stable_for_identity_recurrence(sample):
    circuit, z = sample
    y, a = circuit.dn_fixed_point(z)
    report = analyze(circuit, y, a)
    assert report.label == "stable" and report.margin < 0
    assert np.all(report.eigenvalues.real < 0)
    assert loop_gain(circuit, y) < 1


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_sampled_circuits_are_stable_with_heterogeneous_time_constants(seed):
    sample = sample_circuit(np.random.default_rng(seed), n_max=60, rectified=seed % 2 == 1)
    y, a = sample.circuit.dn_fixed_point(sample.z)
    assert analyze(sample.circuit, y, a).label == "stable"


@pytest.mark.parametrize("rectified", [False, True])
@pytest.mark.parametrize("recurrent_norm", [None, 1.0, 3.0])
def test_analytic_jacobian_matches_autograd(rectified, recurrent_norm):
    rng = np.random.default_rng(1)
    for _ in range(20):
        circuit = sample_circuit(rng, n_max=12, rectified=rectified, recurrent_norm=recurrent_norm).circuit
        y = rng.standard_normal(circuit.n)
        a = rng.uniform(0.01, 3.0, circuit.n)
        J = jacobian(circuit, y, a)
        assert J.shape == (2 * circuit.n, 2 * circuit.n)
        np.testing.assert_allclose(J, jacobian_autograd(circuit, y, a), rtol=1e-12, atol=1e-10 * np.abs(J).max())


def test_jacobian_at_dn_fixed_point_has_the_block_form():
    rng = np.random.default_rng(2)
    sample = sample_circuit(rng, n=5)
    c, (y, a) = sample.circuit, sample.circuit.dn_fixed_point(sample.z)
    s = np.sqrt(a)
    expected = np.block(
        [
            [np.diag(-s / c.tau_y), np.diag(-y / (2 * s * c.tau_y))],
            [c.W * (2 * a * y)[None, :] / c.tau_a[:, None], (-np.eye(5) + c.W * (y**2)[None, :]) / c.tau_a[:, None]],
        ]
    )
    np.testing.assert_allclose(jacobian(c, y, a), expected, rtol=1e-13, atol=1e-15)


def test_jacobian_is_batched():
    rng = np.random.default_rng(3)
    circuit = sample_circuit(rng, n=4, recurrent_norm=1.0).circuit
    y = rng.standard_normal((3, 2, 4))
    a = rng.uniform(0.1, 1.0, (3, 2, 4))
    J = jacobian(circuit, y, a)
    assert J.shape == (3, 2, 8, 8)
    np.testing.assert_allclose(J[2, 1], jacobian(circuit, y[2, 1], a[2, 1]))
    np.testing.assert_allclose(spectral_abscissa(J)[2, 1], spectral_abscissa(J[2, 1]))


@pytest.mark.parametrize("rectified", [False, True])
def test_jacobian_of_batched_torch_tensors_equals_numpy(rectified):
    """One implementation for both: CircuitTensors and (samples, steps, n) tensors give the NumPy matrices."""
    rng = np.random.default_rng(4)
    circuit = sample_circuit(rng, n=5, rectified=rectified, recurrent_norm=2.0).circuit
    y = rng.standard_normal((3, 2, 5))
    a = rng.uniform(0.1, 1.0, (3, 2, 5))
    J = jacobian(circuit.tensors(), torch.tensor(y), torch.tensor(a))
    assert isinstance(J, torch.Tensor) and J.shape == (3, 2, 10, 10)
    np.testing.assert_allclose(J.numpy(), jacobian(circuit, y, a), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(spectral_abscissa(J).numpy(), spectral_abscissa(jacobian(circuit, y, a)), rtol=1e-10)
    shared = circuit.tensors()._replace(tau_y=torch.tensor(2.0, dtype=torch.float64))  # scalar time constant
    expected = jacobian(Circuit(circuit.W, tau_y=2.0, tau_a=circuit.tau_a, W_r=circuit.W_r, rectified=rectified), y, a)
    np.testing.assert_allclose(jacobian(shared, torch.tensor(y), torch.tensor(a)).numpy(), expected, rtol=1e-14)


def test_spectrum_sorted_and_classification():
    J = np.diag([-3.0, 1e-13, -1.0])
    lam = spectrum(J)
    assert np.array_equal(lam.real, [1e-13, -1.0, -3.0])
    assert classify(-1e-3) == "stable" and classify(1e-3) == "unstable" and classify(1e-13) == "marginal"
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tol must be finite and >= 0"):
            classify(0.0, tol=bad)


def test_margin_is_scaled_by_fastest_time_constant():
    c = Circuit(np.zeros((1, 1)), sigma=1.0, b0=1.0, tau_y=4.0, tau_a=0.5)
    report = analyze(c, [0.0], [1.0])  # uncoupled: eigenvalues -1/tau_y and -1/tau_a
    np.testing.assert_allclose(report.abscissa, -0.25)
    np.testing.assert_allclose(report.margin, -0.25 * 0.5)


def test_a_nan_margin_is_not_classified():
    with pytest.raises(ValueError, match="margin must be a number"):
        classify(float("nan"))


def test_bad_states_raise():
    c = Circuit(np.ones((2, 2)))
    with pytest.raises(ValueError, match="a must be > 0"):
        jacobian(c, [0.1, 0.2], [0.0, 1.0])
    with pytest.raises(ValueError, match="y must have shape"):
        jacobian(c, [0.1], [1.0])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_spectral_abscissa_is_negative_up_to_dimension_100(seed, rectified):
    """W_r = I, n up to 100, tau_a/tau_y in 1e-3..1e3 (log-uniform): max Re(lambda) < 0 at the DN fixed point."""
    sample = sample_circuit(np.random.default_rng(seed), n_max=100, rectified=rectified)
    y, a = sample.circuit.dn_fixed_point(sample.z)
    assert spectral_abscissa(jacobian(sample.circuit, y, a)) < 0


@settings(max_examples=100, deadline=None)
@given(identity_circuits())
def test_inactive_neurons_of_a_rectified_circuit_decouple_in_the_jacobian(sample):
    """Theorem 1, rectified model: the columns of y_i and a_i with y_s,i <= 0 hold only -1/tau on the diagonal."""
    circuit, z = sample
    if not circuit.rectified:
        circuit = Circuit(circuit.W, b=circuit.b, b0=circuit.b0, sigma=circuit.sigma, tau_y=circuit.tau_y,
                          tau_a=circuit.tau_a, rectified=True)  # fmt: skip
    y, a = circuit.dn_fixed_point(z)
    J = jacobian(circuit, y, a)
    n, inactive = circuit.n, np.flatnonzero(y <= 0)
    columns = np.concatenate([inactive, n + inactive])
    block = J[:, columns].copy()
    np.testing.assert_array_equal(block[columns, np.arange(len(columns))], -1 / np.concatenate(
        [circuit.tau_y[inactive], circuit.tau_a[inactive]]))  # fmt: skip
    block[columns, np.arange(len(columns))] = 0
    assert not block.any()
