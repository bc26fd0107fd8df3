"""The 2D circuit: all fixed points from the quartic, their stability, and the paper's Fig. 1 cases."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import fsolve

from organics.circuit import Circuit, drift
from organics.planar import fixed_point_polynomial, fixed_points, planar_circuit, vector_field
from organics.solver import simulate

FIG1 = {"a": (0.5, 0.5, 0.1), "b": (2.0, 0.5, 0.1), "c": (2.0, 1.0, 1.0)}


@st.composite
def planar_parameters(draw):
    return dict(
        w_r=10 ** draw(st.floats(-3, 2)),
        w=10 ** draw(st.floats(-3, 2)),
        b=draw(st.floats(1e-3, 1.0)),
        b0=10 ** draw(st.floats(-2, 1)),
        sigma=10 ** draw(st.floats(-3, 1)),
        tau_y=10 ** draw(st.floats(-1, 1)),
        tau_a=10 ** draw(st.floats(-2, 2)),
        rectified=draw(st.booleans()),
    ), draw(st.sampled_from([-1.0, 1.0])) * 10 ** draw(st.floats(-2, 2))


@settings(max_examples=200, deadline=None)
@given(planar_parameters())
def test_fixed_points_have_zero_drift_and_one_is_stable(sample):
    params, z = sample
    circuit = planar_circuit(**params)
    points = fixed_points(circuit, z)
    assert any(p.stable for p in points)
    for p in points:
        assert p.a >= (params["sigma"] * params["b0"]) ** 2 * (1 - 1e-12) and p.relative_residual <= 1e-9
        dy, da = drift(np.array([p.y]), np.array([p.a]), np.array([z]), circuit)
        r = max(p.y, 0) if params["rectified"] else p.y
        scale_y = max(abs(p.y), params["b"] * abs(z))
        scale_a = max(p.a, params["w"] * p.a * r**2)
        assert abs(dy[0]) * params["tau_y"] <= 1e-9 * scale_y
        assert abs(da[0]) * params["tau_a"] <= 1e-9 * scale_a


@pytest.mark.parametrize("panel", ["a", "b", "c"])
@pytest.mark.parametrize("rectified", [False, True])
def test_polynomial_finds_every_fixed_point(panel, rectified):
    w_r, b0, sigma = FIG1[panel]
    circuit = planar_circuit(w_r, b0=b0, sigma=sigma, rectified=rectified)
    points = fixed_points(circuit, 1.0)
    rng = np.random.default_rng(0)
    for y0, a0 in zip(rng.uniform(-3, 3, 300), rng.uniform(0.001, 3, 300), strict=True):
        sol, info, ok, _ = fsolve(
            lambda x: np.concatenate(drift(x[:1], x[1:], np.ones(1), circuit)), [y0, a0], full_output=True, xtol=1e-13
        )
        if ok == 1 and np.abs(info["fvec"]).max() < 1e-12:
            assert min(np.hypot(sol[0] - p.y, sol[1] - p.a) for p in points) < 1e-6, sol


def test_figure_1_fixed_point_counts():
    expected = {  # (number of fixed points, number stable), main then rectified model
        "a": ((1, 1), (1, 1)),
        "b": ((3, 1), (1, 1)),
        "c": ((1, 1), (1, 1)),
    }
    for panel, (w_r, b0, sigma) in FIG1.items():
        for rectified, counts in zip((False, True), expected[panel], strict=True):
            points = fixed_points(planar_circuit(w_r, b0=b0, sigma=sigma, rectified=rectified), 1.0)
            assert (len(points), sum(p.stable for p in points)) == counts, (panel, rectified)


def test_stable_fixed_point_attracts_nearby_trajectories():
    circuit = planar_circuit(2.0)
    stable = next(p for p in fixed_points(circuit, 1.0) if p.stable)
    traj = simulate(circuit, np.ones(1), 400.0, y0=[stable.y + 0.05], a0=[stable.a * 1.1])
    np.testing.assert_allclose([traj.y[-1, 0], traj.a[-1, 0]], [stable.y, stable.a], atol=1e-8)


def test_polynomial_roots_reproduce_the_fixed_points():
    circuit = planar_circuit(2.0)
    g = fixed_point_polynomial(circuit, 1.0)
    assert g.degree() == 4
    for p in fixed_points(circuit, 1.0):
        assert abs(g(np.sqrt(p.a))) < 1e-10
    assert fixed_point_polynomial(planar_circuit(0.0), 1.0).degree() == 2


def test_zero_input_and_negative_input_cases():
    main = fixed_points(planar_circuit(2.0, sigma=0.1), 0.0)
    ys = sorted(p.y for p in main)
    assert len(main) == 3 and ys[1] == 0.0 and np.isclose(ys[0], -ys[2])
    rect = fixed_points(planar_circuit(2.0, rectified=True), -1.0)
    assert any(np.isclose(p.y, -0.5) and np.isclose(p.a, 0.05**2) and p.stable for p in rect)


def test_vector_field_shapes_and_bad_circuit():
    circuit = planar_circuit(1.0)
    Y, A = np.meshgrid(np.linspace(-1, 1, 4), np.linspace(0, 1, 3))
    dY, dA = vector_field(circuit, 1.0, Y, A)
    assert dY.shape == dA.shape == (3, 4)
    with pytest.raises(ValueError, match="two-dimensional"):
        fixed_points(Circuit(np.ones((2, 2))), 1.0)
