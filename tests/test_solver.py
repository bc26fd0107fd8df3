"""Integration accuracy and fixed points (simulation and Algorithm 1)."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from organics.circuit import Circuit, absolute_residual, dn_fixed_point
from organics.planar import fixed_points, planar_circuit
from organics.sampling import sample_circuit, sample_moderate_circuit
from organics.solver import (
    ConvergenceError,
    algorithm1_update,
    anderson,
    fixed_point_by_simulation,
    integrate,
    iterate_fixed_point,
    newton_fixed_points,
    relative_residual,
    simulate,
)


def test_simulate_matches_exact_solution_of_linear_a_equation():
    # With y held at 0 (z = 0, y0 = 0), tau_a da/dt = -a + (sigma b0)^2 has an exact solution.
    c = Circuit(W=np.ones((1, 1)), sigma=0.3, b0=0.7, tau_a=3.0)
    t = np.linspace(0, 10, 11)
    traj = simulate(c, np.zeros(1), 10.0, t_eval=t)
    exact = (0.3 * 0.7) ** 2 * (1 - np.exp(-t / 3.0))
    np.testing.assert_allclose(traj.a[:, 0], exact, rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(traj.y, 0.0)


@pytest.mark.parametrize("rectified", [False, True])
def test_simulation_converges_to_dn_fixed_point(rectified):
    rng = np.random.default_rng(3)
    n = 12
    c = Circuit(
        W=rng.uniform(0, 1, (n, n)),
        b=rng.uniform(0.1, 1, n),
        sigma=rng.uniform(0.05, 1, n),
        tau_y=rng.uniform(1, 5, n),
        tau_a=rng.uniform(1, 5, n),
        rectified=rectified,
    )
    z = rng.normal(size=n)
    fp = fixed_point_by_simulation(c, z)
    y, a = c.dn_fixed_point(z)
    np.testing.assert_allclose(fp.y, y, atol=1e-8)
    np.testing.assert_allclose(fp.a, a, atol=1e-8)


@pytest.mark.parametrize("method,order", [("euler", 1), ("rk4", 4)])
def test_torch_integration_converges_at_its_order(method, order):
    rng = np.random.default_rng(4)
    n = 4
    c = Circuit(W=rng.uniform(0, 1, (n, n)), tau_y=2.0, tau_a=3.0, W_r=0.5 * np.eye(n))
    z = rng.uniform(0.2, 1, n)
    a0 = np.full(n, 0.5)  # away from a = 0, where sqrt(a+) is not smooth
    ref = simulate(c, z, 4.0, a0=a0, t_eval=[4.0])
    errors = []
    for steps in (40, 80):
        y, a = integrate(c, torch.tensor(z[None]), 4.0 / steps, steps, a0=torch.tensor(a0[None]), method=method)
        errors.append(np.abs(y[0].numpy() - ref.y[-1]).max())
    assert errors[1] < errors[0]
    assert np.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.3)


def test_torch_integration_is_batched_and_differentiable():
    c = Circuit(W=np.full((3, 3), 0.2))
    z = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    y, a, ys, as_ = integrate(c, z, 0.1, 20, return_trajectory=True)
    assert y.shape == (5, 3) and ys.shape == (21, 5, 3)
    y.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 20))
def test_algorithm1_converges_to_simulated_fixed_point(seed, n):
    rng = np.random.default_rng(seed)
    c = sample_moderate_circuit(rng, n, 1.0).circuit
    z = rng.normal(size=n)
    z *= rng.uniform(0.05, 0.99) / np.linalg.norm(z)
    it = iterate_fixed_point(c, z)
    sim = fixed_point_by_simulation(c, z, y0=rng.uniform(-0.1, 0.1, n), a0=rng.uniform(0, 0.1, n))
    assert it.absolute_residual < 1e-10 and it.history.shape == (it.iterations + 1, 2 * n)
    np.testing.assert_allclose(it.y, sim.y, atol=1e-7)
    np.testing.assert_allclose(it.a, sim.a, atol=1e-7)


def test_algorithm1_update_is_the_same_for_numpy_and_batched_torch():
    rng = np.random.default_rng(7)
    circuits = [sample_moderate_circuit(rng, 6, 0.9) for _ in range(3)]
    c = circuits[0].circuit
    z = np.stack([s.z for s in circuits])
    y, a = rng.normal(size=(3, 6)), rng.uniform(0.1, 2, (3, 6))
    ty, ta = algorithm1_update(torch.tensor(y), torch.tensor(a), torch.tensor(z), c.tensors())
    for i in range(3):
        ny, na = algorithm1_update(y[i], a[i], z[i], c)
        np.testing.assert_allclose(ty[i].numpy(), ny, rtol=1e-12)
        np.testing.assert_allclose(ta[i].numpy(), na, rtol=1e-12)


def test_algorithm1_is_exact_in_one_step_for_identity():
    c = Circuit(W=np.full((3, 3), 0.5))
    fp = iterate_fixed_point(c, np.array([0.3, -0.2, 0.9]))
    assert fp.iterations == 0 and fp.absolute_residual < 1e-14


def test_algorithm1_reports_non_convergence():
    rng = np.random.default_rng(5)
    c = sample_moderate_circuit(rng, 10, 1.0).circuit
    with pytest.raises(ConvergenceError, match="did not converge in 2 iterations"):
        iterate_fixed_point(c, 0.5 * np.ones(10) / np.sqrt(10), max_iter=2, tol=1e-300)
    fp = iterate_fixed_point(c, 0.5 * np.ones(10) / np.sqrt(10), max_iter=2, tol=1e-300, raise_on_failure=False)
    assert fp.iterations == 2 and fp.absolute_residual > 0
    for name, bad in (("tol", -1.0), ("tol", float("inf")), ("rtol", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be finite and >= 0"):
            iterate_fixed_point(c, np.zeros(10), **{name: bad})


def test_algorithm1_never_returns_a_diverged_iteration_as_converged():
    """A NaN residual (modulators overflowing to inf) is a failure, never a fixed point."""
    sample = sample_circuit(np.random.default_rng(16), n_max=20, recurrent_norm=1.5)  # a overflows: NaN drift
    with np.errstate(all="ignore"), pytest.raises(ConvergenceError):
        iterate_fixed_point(sample.circuit, sample.z, max_iter=200)


def test_algorithm1_rejects_rectified_model():
    with pytest.raises(ValueError, match="main model"):
        iterate_fixed_point(Circuit(W=np.ones((2, 2)), rectified=True), np.ones(2))


def test_simulation_reports_non_convergence():
    c = Circuit(W=np.ones((2, 2)), tau_y=1.0, tau_a=1.0)
    with pytest.raises(ConvergenceError, match="no fixed point"):
        fixed_point_by_simulation(c, np.ones(2), tol=1e-300, max_rounds=1)


def large_modulator_circuit() -> tuple[Circuit, np.ndarray]:
    """A circuit whose modulators sit at about 1e8, with sigma_max(W_r) = 0.8."""
    rng = np.random.default_rng(0)
    W_r = rng.standard_normal((4, 4))
    W_r *= 0.8 / np.linalg.norm(W_r, 2)
    return Circuit(rng.uniform(0, 1, (4, 4)), b=0.9, b0=100.0, sigma=100.0, W_r=W_r), rng.normal(size=4)


def test_relative_criterion_accepts_a_fixed_point_the_absolute_one_cannot():
    """With a ~ 1e8 the drift's rounding error (~1e-16 * 1e8) exceeds the absolute tolerance 1e-10."""
    c, z = large_modulator_circuit()
    with pytest.raises(ConvergenceError, match="relative residual"):
        iterate_fixed_point(c, z)  # the default: absolute criterion only, unchanged
    fp = iterate_fixed_point(c, z, rtol=1e-12)
    assert fp.a.min() > 1e8 and fp.absolute_residual > 1e-10
    assert fp.relative_residual < 1e-12 and fp.relative_residual == relative_residual(fp.y, fp.a, z, c)
    np.testing.assert_allclose(algorithm1_update(fp.y, fp.a, z, c)[1], fp.a, rtol=1e-14)  # the iterate has converged


def test_relative_criterion_does_not_change_moderate_circuits():
    sample = sample_moderate_circuit(np.random.default_rng(11), 12, 1.0)
    absolute = iterate_fixed_point(sample.circuit, sample.z)
    both = iterate_fixed_point(sample.circuit, sample.z, rtol=1e-300)  # never met: the absolute criterion decides
    assert both.iterations == absolute.iterations and both.absolute_residual == absolute.absolute_residual
    assert absolute.relative_residual < 1e-9


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rectified=st.booleans())
def test_relative_residual_vanishes_at_the_closed_form_fixed_point_at_every_scale(seed, rectified):
    """For W_r = I the DN point is exact: its relative residual is rounding-level whatever the parameter scales."""
    sample = sample_circuit(np.random.default_rng(seed), rectified=rectified)
    c = sample.circuit
    y, a = dn_fixed_point(sample.z, c.b, c.b0, c.sigma, c.W, rectified)
    assert relative_residual(y, a, sample.z, c) < 1e-13
    zero = np.zeros(c.n)  # there each equation is its constant term alone: relative residual 1
    assert relative_residual(zero, zero, sample.z, c) == pytest.approx(1.0, rel=1e-12)


def test_relative_residual_is_the_same_for_numpy_and_batched_torch():
    rng = np.random.default_rng(8)
    sample = sample_circuit(rng, n=5, recurrent_norm=0.7)
    y, a = rng.normal(size=(3, 5)), rng.uniform(0.01, 1e4, (3, 5))
    z = np.broadcast_to(sample.z, (3, 5))
    batched = relative_residual(y, a, z, sample.circuit)
    torched = relative_residual(torch.tensor(y), torch.tensor(a), torch.tensor(z), sample.circuit.tensors())
    np.testing.assert_allclose(torched.numpy(), batched, rtol=1e-12)
    assert [relative_residual(y[i], a[i], z[i], sample.circuit) for i in range(3)] == pytest.approx(batched)


def test_relative_residual_is_zero_where_every_term_is_zero():
    c = Circuit(W=np.ones((2, 2)), W_r=np.zeros((2, 2)))
    y, a = np.zeros(2), np.full(2, (0.1 * 0.5) ** 2)
    assert relative_residual(y, a, np.zeros(2), c) == 0.0 and absolute_residual(y, a, np.zeros(2), c) == 0.0


def test_fixed_point_by_simulation_reports_its_relative_residual():
    c = Circuit(W=np.full((2, 2), 0.3))
    fp = fixed_point_by_simulation(c, np.array([0.4, 0.2]))
    assert fp.relative_residual == relative_residual(fp.y, fp.a, np.array([0.4, 0.2]), c) < 1e-8


@settings(max_examples=30, deadline=None)
@given(
    w_r=st.floats(-3, 3).filter(lambda w: abs(w) > 1e-3),
    z=st.floats(-10, 10).filter(lambda z: abs(z) > 1e-2),
    log_sigma=st.floats(-2, 0.5),
)
def test_newton_finds_only_true_fixed_points_of_the_2d_circuit(w_r, z, log_sigma):
    """Every start that converges lands on one of the fixed points that organics.planar finds exactly."""
    c = planar_circuit(w_r, sigma=10**log_sigma)
    y, a, converged = newton_fixed_points(c, [z], np.geomspace(1e-4, 1e3, 24)[:, None])
    exact = fixed_points(c, z)
    for yi, ai in zip(y[converged, 0], a[converged, 0], strict=True):
        assert any(abs(yi - p.y) <= 1e-6 * max(1, abs(p.y)) and abs(ai - p.a) <= 1e-6 * p.a for p in exact)


def test_newton_from_many_starts_finds_all_three_fixed_points_of_an_expansive_2d_circuit():
    c = planar_circuit(2.0, sigma=0.1)
    y, a, converged = newton_fixed_points(c, [0.1], np.geomspace(1e-3, 1e2, 40)[:, None])
    exact = sorted(p.y for p in fixed_points(c, 0.1))
    assert len(exact) == 3
    np.testing.assert_allclose(sorted(set(np.round(y[converged, 0], 9))), exact, rtol=1e-8)


def test_newton_converges_to_algorithm1_fixed_point_from_nearby_starts():
    sample = sample_moderate_circuit(np.random.default_rng(12), 15, 1.0)
    fp = iterate_fixed_point(sample.circuit, sample.z)
    a0 = fp.a * np.exp(0.2 * np.random.default_rng(0).standard_normal((6, 15)))
    y, a, converged = newton_fixed_points(sample.circuit, sample.z, a0)
    assert converged.all()
    np.testing.assert_allclose(y, np.broadcast_to(fp.y, y.shape), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(a, np.broadcast_to(fp.a, a.shape), rtol=1e-8)


def test_newton_reports_starts_that_do_not_converge():
    sample = sample_moderate_circuit(np.random.default_rng(13), 5, 1.0)
    y, a, converged = newton_fixed_points(sample.circuit, sample.z, np.full((2, 5), 0.5), max_iter=0)
    assert not converged.any() and y.shape == a.shape == (2, 5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: iterate_fixed_point(c, np.ones(2), rtol=-1.0), "rtol"),
        (lambda c: iterate_fixed_point(c, np.ones(2), tol=-1.0), "tol"),
        (lambda c: fixed_point_by_simulation(c, np.ones(2), max_rounds=0), "max_rounds"),
        (lambda c: fixed_point_by_simulation(c, np.ones(2), tol=0.0), "tol"),
        (lambda c: newton_fixed_points(c, np.ones(2), np.ones(2)), "a0 must have shape"),
        (lambda c: newton_fixed_points(c, np.ones(2), np.zeros((3, 2))), "a0 must be finite and > 0"),
        (
            lambda c: newton_fixed_points(Circuit(W=np.ones((2, 2)), rectified=True), np.ones(2), np.ones((1, 2))),
            "main",
        ),
        (lambda c: simulate(c, np.ones(2), -1.0), "t_end"),
        (lambda c: simulate(c, np.ones(2), 1.0, y0=np.ones(3)), "y0"),
        (lambda c: integrate(c, torch.ones(1, 2), 0.0, 3), "dt"),
        (lambda c: integrate(c, torch.ones(1, 2), 0.1, 3, method="heun"), "method"),
        (lambda c: integrate(c, torch.ones(1, 3), 0.1, 3), "z must have shape"),
        (lambda c: integrate(c, torch.full((1, 2), float("nan")), 0.1, 3), "z must be finite"),
    ],
)
def test_solver_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(Circuit(W=np.ones((2, 2))))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rho=st.floats(0.5, 0.999))
@example(seed=196, rho=0.99609375)  # found by hypothesis in CI: its row 1 takes 218 steps, alone or in the batch
def test_anderson_solves_slowly_contracting_linear_iterations_row_by_row(seed, rho):
    """x <- c + A x with spectral radius rho up to 0.999 (a plain iteration: up to 27,000 steps to 1e-12):
    Anderson acceleration (depth 5) reaches x = (I - A)^{-1} c in at most 300 steps, each row as if alone.

    Usually far fewer: at most 182 in 1,500 random draws; the example above needs 218."""
    g = torch.Generator().manual_seed(seed)
    B, d = 4, 12
    Q = torch.linalg.qr(torch.randn(B, d, d, dtype=torch.float64, generator=g))[0]
    A = Q @ torch.diag_embed(rho * torch.rand(B, d, dtype=torch.float64, generator=g)) @ Q.mT  # symmetric
    c = torch.randn(B, d, dtype=torch.float64, generator=g)
    x_star = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - A, c[..., None])[..., 0]

    def step(x):
        return c + (A @ x[..., None])[..., 0]

    def converged(f, moved):
        return moved < 1e-12

    x, k, ok = anderson(step, torch.zeros_like(c), converged, max_iter=300)
    assert ok
    torch.testing.assert_close(x, x_star, rtol=1e-9, atol=1e-9)
    alone, _, _ = anderson(lambda x: c[1:2] + (A[1:2] @ x[..., None])[..., 0], torch.zeros_like(c[1:2]),
                           converged, max_iter=300)  # fmt: skip
    torch.testing.assert_close(alone, x_star[1:2], rtol=1e-9, atol=1e-9)


def test_anderson_reports_what_it_cannot_do():
    x = torch.ones(2, 3, dtype=torch.float64)
    never = lambda f, moved: torch.zeros(len(f), dtype=torch.bool)  # noqa: E731
    _, k, ok = anderson(lambda x: 2 * x + 1, x, never, max_iter=7)
    assert k == 7 and not ok
    _, _, ok = anderson(lambda x: x * float("inf"), x, never)
    assert not ok
    for name, value in (("depth", 0), ("max_iter", 0), ("depth", 2.5), ("max_iter", True)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            anderson(lambda x: x, x, never, **{name: value})
