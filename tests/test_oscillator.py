"""Second-order (damped oscillator) form of the linearised W_r = I circuit and its energy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import expm

from organics.circuit import Circuit
from organics.oscillator import energy_weights, oscillator_form, quadratic_lyapunov
from organics.sampling import sample_circuit
from organics.solver import simulate
from organics.stability import jacobian


def _sample(seed, n_max=15):
    sample = sample_circuit(np.random.default_rng(seed), n_max=n_max)
    return sample.circuit, sample.z


def _to_oscillator_coordinates(form):
    """Matrix T with (u, u') = T (y - y_s, a - a_s)."""
    n = form.mass.size
    zeros = np.zeros((n, n))
    return np.block([[np.eye(n), zeros], [form.velocity(np.eye(n), zeros).T, form.velocity(zeros, np.eye(n)).T]])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_second_order_form_is_similar_to_the_jacobian(seed):
    circuit, z = _sample(seed)
    form = oscillator_form(circuit, z)
    J = jacobian(circuit, form.y_s, form.a_s)
    T = _to_oscillator_coordinates(form)
    lhs, rhs = form.companion() @ T, T @ J
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-12 * np.abs(rhs).max())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_energy_weights_make_the_dissipation_positive_definite(seed):
    circuit, z = _sample(seed, n_max=40)
    form = oscillator_form(circuit, z)
    delta = energy_weights(form)
    assert np.all(delta > 0)
    sym = delta[:, None] * form.damping
    sym = sym + sym.T
    assert np.linalg.eigvalsh(sym / np.abs(sym).max()).min() > 0
    assert np.all(form.damping_ratios > 0)


def test_one_neuron_frequency_and_damping_ratio():
    c = Circuit(np.array([[0.7]]), b=0.4, b0=0.3, sigma=0.2, tau_y=1.5, tau_a=4.0)
    form = oscillator_form(c, np.array([2.0]))
    (y,), (a,) = c.dn_fixed_point(np.array([2.0]))
    s = np.sqrt(a)
    np.testing.assert_allclose(form.natural_frequencies, np.sqrt(s / (4.0 * 1.5)))
    np.testing.assert_allclose(form.damping_ratios, (4.0 * s + 1.5 * (1 - 0.7 * y**2)) / (2 * np.sqrt(6.0 * s)))


def test_energy_decreases_along_linearised_flow():
    circuit, z = _sample(11, n_max=8)
    form = oscillator_form(circuit, z)
    delta = energy_weights(form)
    J = jacobian(circuit, form.y_s, form.a_s)
    n = circuit.n
    x0 = np.random.default_rng(0).standard_normal(2 * n) * np.concatenate([np.abs(form.y_s), form.a_s])
    dt = 0.05 * float(min(circuit.tau_y.min(), circuit.tau_a.min()))
    step = expm(J * dt)
    xs = [x0]
    for _ in range(400):
        xs.append(step @ xs[-1])
    xs = np.array(xs)
    E = form.energy(xs[:, :n], xs[:, n:], delta)
    assert np.all(form.energy_rate(xs[:, :n], xs[:, n:], delta) <= 0)
    assert np.all(np.diff(E) <= 1e-12 * E[0])


def test_energy_decreases_along_simulated_trajectory_near_fixed_point():
    c = Circuit(np.array([[0.5, 0.2, 0.0], [0.1, 0.4, 0.3], [0.6, 0.0, 0.2]]), b=0.8, b0=0.5, sigma=0.2)
    z = np.array([1.0, 0.5, 2.0])
    form = oscillator_form(c, z)
    delta = energy_weights(form)
    eps = 1e-4
    rng = np.random.default_rng(1)
    y0 = form.y_s * (1 + eps * rng.standard_normal(3))
    a0 = form.a_s * (1 + eps * rng.standard_normal(3))
    traj = simulate(c, z, 60.0, y0=y0, a0=a0, t_eval=np.linspace(0, 60, 601))
    E = form.energy(traj.y - form.y_s, traj.a - form.a_s, delta)
    assert E[-1] < 1e-6 * E[0]
    # Nonlinear terms are O(eps) relative to the quadratic dissipation.
    assert np.all(np.diff(E) <= 10 * eps * E[0])
    P = quadratic_lyapunov(jacobian(c, form.y_s, form.a_s))
    x = np.concatenate([traj.y - form.y_s, traj.a - form.a_s], axis=1)
    V = np.einsum("ti,ij,tj->t", x, P, x)
    assert np.linalg.eigvalsh(P).min() > 0
    keep = V > 1e-10 * V[0]
    assert np.all(np.diff(V[keep]) < 0)


def test_oscillator_form_rejects_unsupported_circuits():
    with pytest.raises(ValueError, match="circuit"):
        oscillator_form(Circuit(np.ones((1, 1)), rectified=True), np.ones(1))
    with pytest.raises(ValueError, match="circuit"):
        oscillator_form(Circuit(np.ones((1, 1)), W_r=2 * np.ones((1, 1))), np.ones(1))
    with pytest.raises(ValueError, match="z"):
        oscillator_form(Circuit(np.ones((2, 2))), np.array([1.0, 0.0]))
