"""The circuit's parameters, drift and divisive-normalization fixed point."""

import numpy as np
import pytest
import torch
from helpers import random_circuit
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import root

from organics.circuit import Circuit, absolute_residual, dn_fixed_point, drift, relative_residual


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1), rectified=st.booleans())
def test_dn_fixed_point_is_a_fixed_point(n, seed, rectified):
    rng = np.random.default_rng(seed)
    c = random_circuit(rng, n, rectified=rectified)
    z = rng.normal(size=n)
    y, a = c.dn_fixed_point(z)
    dy, da = drift(y, a, z, c)
    assert np.abs(dy).max() < 1e-10 and np.abs(da).max() < 1e-10
    bz = c.b * z if not rectified else np.maximum(c.b * z, 0)
    dn = bz**2 / ((c.sigma * c.b0) ** 2 + c.W @ bz**2)
    np.testing.assert_allclose(np.maximum(y, 0) ** 2 if rectified else y**2, dn, rtol=1e-12, atol=1e-15)


def test_drift_numpy_and_torch_agree_batched():
    rng = np.random.default_rng(1)
    c = random_circuit(rng, 7, W_r=rng.normal(size=(7, 7)))
    y, a, z = (rng.normal(size=(5, 7)) for _ in range(3))
    a = np.abs(a)
    dy, da = drift(y, a, z, c)
    p = c.tensors()
    ty, ta = drift(torch.tensor(y), torch.tensor(a), torch.tensor(z), p)
    np.testing.assert_allclose(ty.numpy(), dy, rtol=1e-12)
    np.testing.assert_allclose(ta.numpy(), da, rtol=1e-12)
    for i in range(5):
        np.testing.assert_allclose(drift(y[i], a[i], z[i], c)[0], dy[i], rtol=1e-12)


def test_absolute_residual_is_the_max_norm_of_the_drift_for_numpy_and_torch():
    rng = np.random.default_rng(3)
    c = random_circuit(rng, 5)
    y, a, z = rng.normal(size=(4, 5)), rng.uniform(0.1, 1, (4, 5)), rng.normal(size=(4, 5))
    dy, da = drift(y, a, z, c)
    expected = np.maximum(np.abs(dy).max(-1), np.abs(da).max(-1))
    np.testing.assert_allclose(absolute_residual(y, a, z, c), expected, rtol=1e-15)
    torch_res = absolute_residual(torch.tensor(y), torch.tensor(a), torch.tensor(z), c.tensors())
    np.testing.assert_allclose(torch_res.numpy(), expected, rtol=1e-12)
    assert isinstance(absolute_residual(y[0], a[0], z[0], c), float)
    assert absolute_residual(*c.dn_fixed_point(z[0]), z[0], c) < 1e-12


def test_dn_fixed_point_torch_matches_numpy():
    rng = np.random.default_rng(2)
    c = random_circuit(rng, 6)
    z = rng.normal(size=(3, 6))
    y, a = dn_fixed_point(z, c.b, c.b0, c.sigma, c.W)
    p = c.tensors()
    ty, ta = dn_fixed_point(torch.tensor(z), p.b, p.b0, p.sigma, p.W)
    np.testing.assert_allclose(ty.numpy(), y, rtol=1e-12)
    np.testing.assert_allclose(ta.numpy(), a, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tau_y": -1.0}, "tau_y"),
        ({"tau_a": 0.0}, "tau_a"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -0.1}, "sigma"),
        ({"b0": np.nan}, "b0"),
        ({"b": 1.5}, "b"),
        ({"b": np.ones(3)}, "b"),
        ({"W": -np.ones((2, 2))}, "W"),
        ({"W": np.ones((2, 3))}, "W"),
        ({"W": np.full((2, 2), np.nan)}, "W"),
        ({"W_r": np.eye(3)}, "W_r"),
        ({"W_r": np.full((2, 2), np.inf)}, "W_r"),
        ({"W": np.zeros((0, 0))}, "W"),
        ({"rectified": "no"}, "rectified"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(kwargs, name):
    args = {"W": np.ones((2, 2))} | kwargs
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        Circuit(**args)


def test_bad_input_raises():
    c = Circuit(W=np.ones((3, 3)))
    with pytest.raises(ValueError, match="z must have shape"):
        c.dn_fixed_point(np.ones(4))
    with pytest.raises(ValueError, match="z must be finite"):
        c.dn_fixed_point(np.array([1.0, np.nan, 0.0]))


def test_dn_fixed_point_needs_identity_recurrence():
    c = Circuit(W=np.ones((2, 2)), W_r=0.5 * np.eye(2))
    with pytest.raises(ValueError, match="W_r = I"):
        c.dn_fixed_point(np.ones(2))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), rectified=st.booleans())
def test_every_fixed_point_a_root_finder_reaches_is_the_dn_fixed_point(n, seed, rectified):
    """Theorem 1's uniqueness (W_r = I), from starts drawn independently of the fixed point."""
    rng = np.random.default_rng(seed)
    c = random_circuit(rng, n, rectified=rectified)
    z = rng.normal(size=n)
    y_s, a_s = c.dn_fixed_point(z)

    def scaled_drift(x):
        dy, da = drift(x[:n], x[n:], z, c)
        return np.concatenate([dy * c.tau_y, da * c.tau_a])

    for _ in range(5):
        start = np.concatenate([rng.uniform(-5, 5, n), 10 ** rng.uniform(-3, 2, n)])
        solution = root(scaled_drift, start, method="hybr")
        if solution.success and np.abs(scaled_drift(solution.x)).max() < 1e-10:
            found = np.concatenate([y_s, a_s])
            np.testing.assert_allclose(solution.x, found, rtol=1e-6, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 20),
    w=st.floats(1e-2, 1e2),
    b=st.floats(1e-2, 1.0),
    b0=st.floats(1e-2, 10.0),
    sigma=st.floats(1e-3, 10.0),
    contrast=st.floats(0.0, 1e2),
)
@example(m=6, w=2.0, b=1.0, b0=1.0, sigma=1.0, contrast=4.043723777732779e-157)  # responses of 1.6e-313: subnormal
def test_a_pool_of_identical_neurons_follows_the_naka_rushton_curve(m, w, b, b0, sigma, contrast):
    """Chapter 1: (y_s+)^2 = r_max c^2 / (c50^2 + c^2), r_max = 1 / (m w), c50 = sigma b0 / (b sqrt(m w))."""
    c = Circuit(np.full((m, m), w), b=b, b0=b0, sigma=sigma)
    y, _ = c.dn_fixed_point(np.full(m, contrast))
    r_max, c50 = 1 / (m * w), sigma * b0 / (b * np.sqrt(m * w))
    expected = r_max * contrast**2 / (c50**2 + contrast**2)
    # responses below float64's smallest normal (contrast under about 1e-154) are subnormal, with fewer than
    # 53 significant bits: there the two sides agree to within that smallest normal, not relatively
    tiny = np.finfo(np.float64).tiny
    np.testing.assert_allclose(np.maximum(y, 0) ** 2, expected, rtol=1e-10, atol=tiny)


def test_relative_residual_of_a_float32_fixed_point_with_a_zero_input_is_finite():
    """A scale of exactly 0 (a black pixel's drive) is floored at float32's own smallest normal, not float64's."""
    c = Circuit(np.array([[0.5, 0.2], [0.1, 0.3]]))
    z = torch.tensor([0.0, 0.8], dtype=torch.float32)
    y, a = c.dn_fixed_point(z.double().numpy())
    p = c.tensors(dtype=torch.float32)
    residual = relative_residual(torch.tensor(y, dtype=torch.float32), torch.tensor(a, dtype=torch.float32), z, p)
    assert torch.isfinite(residual) and residual < 1e-6
