"""The 2D circuit: all fixed points from the quartic, their stability, and the paper's Fig. 1 cases."""

import matplotlib
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import fsolve

from organics.circuit import Circuit, drift
from organics.planar import (
    fixed_point_polynomial,
    fixed_points,
    planar_circuit,
    plot_phase_portrait,
    trace_determinant,
    vector_field,
)
from organics.solver import simulate
from organics.stability import jacobian

matplotlib.use("Agg")

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
        assert not p.nonsmooth and p.one_sided is None  # z != 0: no fixed point on the kink y = 0
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
    assert not any(p.nonsmooth for p in main)  # r(y) = y is smooth at (0, c)
    rect = fixed_points(planar_circuit(2.0, rectified=True), -1.0)
    assert any(np.isclose(p.y, -0.5) and np.isclose(p.a, 0.05**2) and p.stable for p in rect)


def test_vector_field_shapes_and_bad_circuit():
    circuit = planar_circuit(1.0)
    Y, A = np.meshgrid(np.linspace(-1, 1, 4), np.linspace(0, 1, 3))
    dY, dA = vector_field(circuit, 1.0, Y, A)
    assert dY.shape == dA.shape == (3, 4)
    with pytest.raises(ValueError, match="two-dimensional"):
        fixed_points(Circuit(np.ones((2, 2))), 1.0)


@settings(max_examples=200, deadline=None)
@given(planar_parameters())
def test_closed_form_trace_and_determinant_and_the_lemma(sample):
    """tr J = -d/tau_y - c/(s^2 tau_a), det J = (d c/s^2 + w_r w s y^2)/(tau_y tau_a); d(s) > 0 => stable."""
    params, z = sample
    circuit = planar_circuit(**params)
    for p in fixed_points(circuit, z):
        if params["rectified"] and p.y <= 0:
            continue  # r = 0 around (bz, c): the lemma is about r(y) = y
        d, trace, det = trace_determinant(circuit, p.y, p.a)
        assert d == params["w_r"] * np.sqrt(p.a) + 1 - params["w_r"]
        J = jacobian(circuit, [p.y], [p.a])
        J_aa_terms = (1 + params["w"] * p.y**2) / params["tau_a"]  # the terms that cancel in J_aa
        assert abs(trace - np.trace(J)) <= 1e-8 * (abs(J[0, 0]) + J_aa_terms)
        assert abs(det - np.linalg.det(J)) <= 1e-8 * (abs(J[0, 0]) * J_aa_terms + abs(J[0, 1] * J[1, 0]))
        if d > 0:
            assert trace < 0 < det and p.stability.abscissa < 0


def test_trace_determinant_rejects_points_off_the_smooth_branch():
    with pytest.raises(ValueError, match="y must be > 0"):
        trace_determinant(planar_circuit(2.0, rectified=True), -0.5, 0.0025)
    with pytest.raises(ValueError, match="a must be > 0"):
        trace_determinant(planar_circuit(2.0), 0.5, 0.0)


def test_kink_that_trajectories_leave_is_not_stable():
    """The rectified model at z = 0, w_r = 2: (0, c) is stable from the left only; trajectories leave it."""
    circuit = planar_circuit(2.0, sigma=0.1, b0=0.5, rectified=True)
    kink, pair = fixed_points(circuit, 0.0)
    assert (kink.y, kink.nonsmooth, kink.stable, kink.stability.label) == (0.0, True, False, "unstable")
    assert [report.label for report in kink.one_sided] == ["stable", "unstable"]
    np.testing.assert_allclose(kink.one_sided[1].eigenvalues, [0.45, -0.5])  # -d(sqrt c)/tau_y, -1/tau_a
    assert pair.stable and not pair.nonsmooth and pair.one_sided is None and pair.y > 0
    traj = simulate(circuit, np.zeros(1), 200.0, y0=[1e-4], a0=[kink.a])
    assert traj.y[-1, 0] > 0.5
    contractive = planar_circuit(0.5, rectified=True)
    (kink,) = fixed_points(contractive, 0.0)
    assert kink.nonsmooth and kink.stable and all(report.label == "stable" for report in kink.one_sided)
    traj = simulate(contractive, np.zeros(1), 200.0, y0=[1e-2], a0=[kink.a])
    assert abs(traj.y[-1, 0]) < 1e-8


@settings(max_examples=150, deadline=None)
@given(planar_parameters())
def test_zero_input_kink_is_stable_only_if_both_sides_are(sample):
    params, _ = sample
    params["rectified"] = True
    circuit = planar_circuit(**params)
    c = (params["sigma"] * params["b0"]) ** 2
    d_c = params["w_r"] * np.sqrt(c) + 1 - params["w_r"]  # d(sqrt c)
    assume(abs(d_c) > 1e-6 and c > 1e-8)  # below: J_yy = -d(s*)/tau_y = 0 in rounding vs the trace -c/(s^2 tau_a)
    points = fixed_points(circuit, 0.0)
    (kink,) = [p for p in points if p.nonsmooth]
    assert kink.y == 0.0 and np.isclose(kink.a, c)
    left, right = kink.one_sided
    tau_y, tau_a = params["tau_y"], params["tau_a"]
    np.testing.assert_allclose(sorted(left.eigenvalues.real), sorted([-1 / tau_y, -1 / tau_a]), rtol=1e-9)
    np.testing.assert_allclose(sorted(right.eigenvalues.real), sorted([-d_c / tau_y, -1 / tau_a]), rtol=1e-9)
    assert kink.stability.abscissa == max(left.abscissa, right.abscissa)
    assert kink.stable == (left.label == right.label == "stable")
    assert (kink.stability.abscissa < 0) == (d_c > 0)
    assert any(p.stability.abscissa < 0 for p in points)  # the theorem at z = 0: the kink or the pair's y > 0


def test_phase_portrait_draws_a_non_smooth_point_as_a_diamond():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plot_phase_portrait(planar_circuit(2.0, rectified=True), 0.0, ax=ax, resolution=20)
    markers = {(line.get_marker(), line.get_color()) for line in ax.lines}
    assert ("D", "black") in markers and ("*", "red") in markers
    plt.close(fig)


@pytest.mark.parametrize("z", [1e-7, 1e-9])
@pytest.mark.parametrize("rectified", [False, True])
def test_a_small_input_keeps_the_fixed_points_near_the_symmetric_pair(z, rectified):
    """Near b z = 0 the quartic's roots nearly coincide (d(s) = 0): the fixed points must not be merged or lost."""
    found = fixed_points(planar_circuit(2.0, rectified=rectified), z)
    stable_positive = [p for p in found if p.y > 0.9 and p.stability.label == "stable"]
    assert len(stable_positive) == 1 and np.isclose(stable_positive[0].a, 0.25)
    if not rectified:
        assert len(found) == 3 and found[0].y < -0.9 and found[0].stability.label == "stable"
    far = fixed_points(planar_circuit(1.5, w=1e-3, b=1e-4), 0.01)  # |b z| sqrt(w) small through b and w
    assert [round(p.y, 3) for p in far] == [-31.265, -0.0, 31.265]


def test_a_fixed_point_reached_from_two_candidates_is_listed_once():
    """w = 0: the quartic has a double root where d(s) = 0, which rounding splits into two candidates."""
    for w_r in (1.5, 1.7, 3.0, 3.7):
        found = fixed_points(planar_circuit(w_r, w=0.0), 1.0)
        assert len(found) == 1, (w_r, [(p.y, p.a) for p in found])
