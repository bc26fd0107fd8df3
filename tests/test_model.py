"""The circuit's parameters, right-hand side and DN steady state."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from organics.model import Circuit, dn_steady_state, drift


def random_circuit(rng: np.random.Generator, n: int, **kw) -> Circuit:
    return Circuit(
        W=rng.uniform(0, 1, (n, n)) * (rng.uniform(size=(n, n)) < 0.7),
        b=rng.uniform(0.05, 1, n),
        b0=rng.uniform(0.05, 2, n),
        sigma=rng.uniform(0.01, 2, n),
        tau_y=rng.uniform(0.5, 20, n),
        tau_a=rng.uniform(0.5, 20, n),
        **kw,
    )


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1), rectified=st.booleans())
def test_steady_state_is_a_fixed_point_and_equals_dn(n, seed, rectified):
    rng = np.random.default_rng(seed)
    c = random_circuit(rng, n, rectified=rectified)
    z = rng.normal(size=n)
    y, a = c.steady_state(z)
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


def test_dn_steady_state_torch_matches_numpy():
    rng = np.random.default_rng(2)
    c = random_circuit(rng, 6)
    z = rng.normal(size=(3, 6))
    y, a = dn_steady_state(z, c.b, c.b0, c.sigma, c.W)
    p = c.tensors()
    ty, ta = dn_steady_state(torch.tensor(z), p.b, p.b0, p.sigma, p.W)
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
    ],
)
def test_bad_parameters_raise_naming_the_parameter(kwargs, name):
    args = {"W": np.ones((2, 2))} | kwargs
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        Circuit(**args)


def test_bad_input_raises():
    c = Circuit(W=np.ones((3, 3)))
    with pytest.raises(ValueError, match="z must have shape"):
        c.steady_state(np.ones(4))
    with pytest.raises(ValueError, match="z must be finite"):
        c.steady_state(np.array([1.0, np.nan, 0.0]))


def test_steady_state_needs_identity_recurrence():
    c = Circuit(W=np.ones((2, 2)), W_r=0.5 * np.eye(2))
    with pytest.raises(ValueError, match="W_r = I"):
        c.steady_state(np.ones(2))
