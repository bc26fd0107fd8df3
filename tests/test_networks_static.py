"""Static ORGaNICs layers (fixed point as output, Algorithm 1 in torch), the MLP baseline and the model catalogue."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import perturbed_layer, sample_of
from hypothesis import given, settings
from hypothesis import strategies as st

from organics.circuit import absolute_residual, dn_fixed_point, drift
from organics.networks import MODELS, build_model, count_parameters, static
from organics.networks.baselines import MLP
from organics.networks.static import (
    SWEEPS,
    CircuitLayer,
    StaticORGaNICs,
    authors_iteration,
    constrain_spectral_norm,
    fixed_point_residual,
    implicit_fixed_point,
    solve_fixed_point,
    sweep_update,
    unrolled_fixed_point,
)
from organics.runs import load_model
from organics.solver import ConvergenceError, iterate_fixed_point


def test_identity_layer_output_is_the_dn_fixed_point():
    torch.manual_seed(1)
    layer = CircuitLayer(10, 5, recurrence="identity").double()
    x = torch.rand(4, 10, dtype=torch.float64)
    with torch.no_grad():
        state = layer.fixed_point(x)
    y_s, a_s = dn_fixed_point(state.z, state.p.b, state.p.b0, state.p.sigma, state.p.W)
    torch.testing.assert_close(layer(x).detach(), y_s, rtol=0, atol=0)
    torch.testing.assert_close(state.a, a_s, rtol=0, atol=0)
    assert fixed_point_residual(state).max() < 1e-12
    np.testing.assert_allclose(sample_of(state, 2).dn_fixed_point(state.z[2].numpy())[0], y_s[2].numpy())


def test_drive_is_normalised_and_gains_in_range():
    layer = CircuitLayer(10, 5)
    z, p = layer.circuit(torch.rand(8, 10) * 5)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(8))
    assert ((p.b > 0) & (p.b <= 1)).all() and ((p.b0 > 0) & (p.b0 < 1)).all()
    assert (p.sigma > 0).all() and (p.W >= 0).all()


def test_learned_recurrence_reaches_the_fixed_point_of_algorithm_1():
    layer = perturbed_layer()
    x = torch.rand(5, 12, dtype=torch.float64)
    assert not torch.allclose(layer.W_r, torch.eye(6, dtype=torch.float64))
    with torch.no_grad():
        state = layer.fixed_point(x, iterations=200)
    assert fixed_point_residual(state).max() < 1e-9
    for i in range(5):
        reference = iterate_fixed_point(sample_of(state, i), state.z[i].numpy(), tol=1e-12)
        np.testing.assert_allclose(state.y[i].numpy(), reference.y, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(state.a[i].numpy(), reference.a, rtol=1e-7, atol=1e-12)


def test_unrolled_fixed_point_starts_at_dn_and_validates():
    layer = perturbed_layer()
    z, p = layer.circuit(torch.rand(3, 12, dtype=torch.float64))
    y0, a0 = unrolled_fixed_point(z, p, 0)
    torch.testing.assert_close(y0, dn_fixed_point(z, p.b, p.b0, p.sigma, p.W)[0])
    with pytest.raises(ValueError, match="iterations"):
        unrolled_fixed_point(z, p, -1)
    with pytest.raises(ValueError, match="rectified"):
        unrolled_fixed_point(z, p._replace(rectified=True), 3)


def test_gradient_through_algorithm_1_is_correct():
    layer = perturbed_layer(input_size=4, hidden_size=3, scale=0.2)
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
    layer = perturbed_layer(scale=5.0)
    assert torch.linalg.matrix_norm(layer.V_r, ord=2) > 1
    assert torch.linalg.matrix_norm(layer.W_r, ord=2) <= 1 + 1e-12


def test_static_models_shapes_and_parameter_counts():
    organics = build_model("organics2", input_size=784)
    mlp = build_model("mlp", input_size=784)
    assert organics(torch.rand(3, 784)).shape == (3, 10) and mlp(torch.rand(3, 784)).shape == (3, 10)
    n_org, n_mlp = count_parameters(organics), count_parameters(mlp)
    assert abs(n_org - n_mlp) / n_org < 0.05


def test_models_are_a_plain_dict_with_one_argument_vocabulary():
    assert set(MODELS) == {"organics2", "mlp", "organics_rnn", "lstm", "ssn"}
    for name, cls in MODELS.items():
        model = build_model(name, input_size=3, num_classes=4)
        assert type(model) is cls
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("no_such_model", input_size=4)
    with pytest.raises(ValueError, match="model_kwargs for 'mlp'"):
        build_model("mlp", input_size=4, hidden=(3,))
    assert isinstance(build_model("mlp", input_size=4, hidden_sizes=(3,)), MLP)
    with pytest.raises(ValueError, match="recurrence"):
        CircuitLayer(4, 3, recurrence="random")
    with pytest.raises(ValueError, match="hidden_sizes"):
        StaticORGaNICs(4, hidden_sizes=())


def test_solve_fixed_point_converges_to_the_unrolled_fixed_point_and_reports_its_work():
    layer = perturbed_layer()
    z, p = layer.circuit(torch.rand(5, 12, dtype=torch.float64))
    y, a, stats = solve_fixed_point(z, p)
    assert 1 <= stats.iterations < 200 and stats.absolute_residual < 1e-11
    y_ref, a_ref = unrolled_fixed_point(z, p, 400)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(a, a_ref.detach(), rtol=1e-9, atol=1e-10)
    assert not y.requires_grad
    with pytest.raises(ConvergenceError, match="did not converge for .* samples in 2 iterations"):
        solve_fixed_point(z, p, max_iter=2)


def test_implicit_gradient_equals_backpropagation_through_the_converged_iteration(monkeypatch):
    layer = perturbed_layer()
    x = torch.rand(4, 12, dtype=torch.float64)
    w, v = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]

    def gradient(solve):
        z, p = layer.circuit(x)
        y, a = solve(z, p)
        return torch.autograd.grad((y * w).sum() + (a * v).sum(), params)

    stats = []

    def implicit_solve(z, p, max_iter=200):
        y, a, record = implicit_fixed_point(z, p, max_iter=max_iter)
        stats.append(record)
        return y, a

    unrolled = gradient(lambda z, p: unrolled_fixed_point(z, p, 300))
    implicit = gradient(implicit_solve)
    assert stats[-1].adjoint_iterations >= 1 and not stats[-1].adjoint_fallback
    monkeypatch.setattr(static._SweepAdjoint, "iterate", lambda *args: None)  # as if the adjoint iterations diverged
    monkeypatch.setattr(static._Adjoint, "iterate", lambda *args: None)
    full = gradient(implicit_solve)
    assert stats[-1].adjoint_fallback  # so the full 2n x 2n adjoint system was solved
    for g_implicit, g_full, g_unrolled in zip(implicit, full, unrolled, strict=True):
        torch.testing.assert_close(g_implicit, g_unrolled, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g_full, g_unrolled, rtol=1e-8, atol=1e-10)


def test_a_second_derivative_through_the_implicit_solve_is_refused_not_wrong():
    """Its backward pass (the adjoint solve) is not differentiable again: create_graph must raise, not mislead."""
    layer = perturbed_layer(input_size=4, hidden_size=3, scale=0.2)
    layer.options = replace(layer.options, gradient="implicit")
    out = layer(torch.rand(2, 4, dtype=torch.float64)).sum()
    with pytest.raises(RuntimeError, match="cannot be differentiated again .*gradient='unrolled'"):
        torch.autograd.grad(out, layer.V_r, create_graph=True)
    (grad,) = torch.autograd.grad(layer(torch.rand(2, 4, dtype=torch.float64)).sum(), layer.V_r)  # first order: fine
    assert torch.isfinite(grad).all()


def test_bad_solver_settings_raise_naming_the_parameter():
    layer = perturbed_layer(input_size=4, hidden_size=3)
    x = torch.rand(2, 4, dtype=torch.float64)
    z, p = layer.circuit(x)
    for kwargs, name in (({"tol": 0.0}, "tol"), ({"tol": float("nan")}, "tol"), ({"max_iter": -5}, "max_iter")):
        with pytest.raises(ValueError, match=f"{name} must be"):
            solve_fixed_point(z, p, **kwargs)
    for kwargs, name in (({"sigma": float("inf")}, "sigma"), ({"iterations": 1.5}, "iterations"),
                         ({"max_iter": 2.5}, "max_iter")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} must be"):
            replace(layer.options, **kwargs)


def test_implicit_gradient_passes_finite_differences():
    layer = perturbed_layer(input_size=4, hidden_size=3, scale=0.2)
    layer.options = replace(layer.options, gradient="implicit")
    x = torch.rand(2, 4, dtype=torch.float64)
    names = ("V_r", "log_W", "log_sigma", "W_zx.weight", "W_bx.weight", "b0_logit")
    params = dict(layer.named_parameters())

    def output(*values):
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    inputs = [params[k].detach().clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(output, inputs, atol=1e-6)
    assert layer.last_solve is not None and layer.last_solve.absolute_residual < 1e-11


def test_paper_layer_options():
    torch.manual_seed(0)
    layer = CircuitLayer(40, 50, preset="paper")
    assert torch.linalg.matrix_norm(layer.W_r.detach(), ord=2).item() == pytest.approx(1.0)
    W = layer.W_r.detach()
    with torch.no_grad():
        layer.V_r.mul_(3.0).add_(torch.randn(50, 50))
    assert torch.linalg.matrix_norm(layer.W_r.detach(), ord=2).item() == pytest.approx(1.0)
    assert torch.equal(W, torch.eye(50))
    names = dict(layer.named_parameters())
    assert "log_sigma" not in names and "W_bx.bias" not in names and torch.all(layer.log_sigma == 0)
    assert torch.all(layer.log_W.diagonal() == 0) and layer.log_W.min() >= -1
    out = layer(torch.rand(8, 40))
    assert out.shape == (8, 50) and torch.all(out >= 0) and layer.last_solve.iterations >= 1
    with pytest.raises(ValueError, match="unknown layer options"):
        CircuitLayer(4, 3, recurence="learned")
    with pytest.raises(ValueError, match="gradient"):
        CircuitLayer(4, 3, gradient="adjoint")
    for args, kwargs, message in (((4, 2.5), {}, "hidden_size must be an integer"), ((0, 3), {}, "input_size"),
                                  ((4, 3), {"tau_a": float("inf")}, "tau_a must be finite")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            CircuitLayer(*args, **kwargs)


def test_autoencoder_front_end_adds_its_reconstruction_loss():
    torch.manual_seed(0)
    model = StaticORGaNICs(784, hidden_sizes=(20,), front_end="autoencoder", preset="paper")
    x = torch.rand(6, 784)
    logits = model(x)
    assert logits.shape == (6, 10) and model.auxiliary_loss.ndim == 0 and model.auxiliary_loss > 0
    assert model.layers[0].W_zx.in_features == 40
    states = model.fixed_points(x)
    assert states[0].y.shape == (6, 20)
    assert StaticORGaNICs(784).auxiliary_loss is None
    with pytest.raises(ValueError, match="front_end"):
        StaticORGaNICs(784, front_end="vae")


def _paper_layer(n: int = 20, input_size: int = 10, random_recurrence: bool = True, seed: int = 0) -> CircuitLayer:
    """A float64 paper-era layer (sigma = 1, W = exp(U(-1, 0)), b0 = 1/2) with W_r = I or a random unit-SN W_r."""
    torch.manual_seed(seed)
    layer = CircuitLayer(input_size, n, preset="paper").double()
    if random_recurrence:
        with torch.no_grad():
            layer.V_r.add_(torch.randn(n, n, dtype=torch.float64))
    return layer


def test_authors_iteration_lands_away_from_the_fixed_point_where_the_recurrence_is_learned():
    layer = _paper_layer()
    with torch.no_grad():
        z, p = layer.circuit(torch.rand(16, 10, dtype=torch.float64))
        unit = p._replace(tau_y=torch.ones((), dtype=torch.float64), tau_a=torch.ones((), dtype=torch.float64))
        y, a, _ = solve_fixed_point(z, p)
        y10, a10 = authors_iteration(z, p, 10)  # the authors' default
        y_lim, a_lim = authors_iteration(z, p, 100)
    assert torch.linalg.matrix_norm(p.W_r, ord=2) == pytest.approx(1.0)
    assert not torch.allclose(p.W_r, torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(authors_iteration(z, p, 101), (y_lim, a_lim), rtol=0, atol=1e-13)  # converged
    for y_a, a_a in ((y10, a10), (y_lim, a_lim)):
        assert ((y_a - y).abs().amax(-1) > 1e-2).all()  # every sample's point differs from the fixed point
        assert (absolute_residual(y_a, a_a, z, unit) > 1e-2).all()  # ... and is far from being one
    assert (absolute_residual(y, a, z, unit) < 1e-11).all()
    # the limit solves the a-equation, and leaves F_y = (a - sqrt(a)) W_r y in the y-equation
    F_y, F_a = drift(y_lim, a_lim, z, unit)
    torch.testing.assert_close(F_a, torch.zeros_like(F_a), rtol=0, atol=1e-12)
    torch.testing.assert_close(F_y, (a_lim - a_lim.sqrt()) * (y_lim @ p.W_r.T), rtol=0, atol=1e-12)


def test_authors_iteration_with_identity_recurrence_divides_by_a_not_sqrt_a():
    layer = _paper_layer(random_recurrence=False)  # the learned W_r at initialisation: V = I
    with torch.no_grad():
        z, p = layer.circuit(torch.rand(16, 10, dtype=torch.float64))
        unit = p._replace(tau_y=torch.ones((), dtype=torch.float64), tau_a=torch.ones((), dtype=torch.float64))
        y, a = authors_iteration(z, p, 100)
    torch.testing.assert_close(authors_iteration(z, p, 101), (y, a), rtol=0, atol=1e-13)
    torch.testing.assert_close(a * y, p.b * z, rtol=0, atol=1e-13)  # y = b z / a, not b z / sqrt(a)
    torch.testing.assert_close(a, (p.sigma * p.b0) ** 2 + ((p.b * z) ** 2 / a) @ p.W.T, rtol=0, atol=1e-13)
    residual = absolute_residual(y, a, z, unit)
    torch.testing.assert_close(residual, (p.b * z * (1 - 1 / a.sqrt())).abs().amax(-1), rtol=1e-10, atol=1e-14)
    assert (residual > 1e-2).all() and (a < 0.9).all()  # a is far from 1 here, so y is far from DN
    y_dn, _ = dn_fixed_point(z, p.b, p.b0, p.sigma, p.W)
    assert ((y - y_dn).abs().amax(-1) > 1e-2).all()
    # only where a = 1 (sigma b0 = 1 and no normalization) do the two coincide
    p1 = p._replace(b0=torch.ones_like(p.b0), W=torch.zeros_like(p.W))
    y1, a1 = authors_iteration(z, p1, 3)
    torch.testing.assert_close(a1, torch.ones_like(a1), rtol=0, atol=0)
    torch.testing.assert_close(y1, dn_fixed_point(z, p1.b, p1.b0, p1.sigma, p1.W)[0], rtol=0, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 6), st.booleans(), st.integers(0, 10_000))
def test_authors_iteration_update_uses_one_minus_a(n, iterations, identity, seed):
    """Every y-update solves y = b z + (1 - a) W_r y with the previous a (any parameters, converged or not)."""
    layer = _paper_layer(n=n, input_size=5, random_recurrence=not identity, seed=seed)
    with torch.no_grad():
        layer.b0_logit.add_(2 * torch.randn(n, dtype=torch.float64))
        z, p = layer.circuit(torch.rand(3, 5, dtype=torch.float64))
        _, a_prev = authors_iteration(z, p, iterations - 1)
        y, a = authors_iteration(z, p, iterations)
    torch.testing.assert_close(y - (1 - a_prev) * (y @ p.W_r.T), p.b * z, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(a, (p.sigma * p.b0) ** 2 + (a_prev * y**2) @ p.W.T, rtol=1e-12, atol=1e-14)


def test_authors_iteration_starts_from_their_estimate_validates_and_is_differentiable():
    layer = _paper_layer(n=4, input_size=3)
    x = torch.rand(2, 3, dtype=torch.float64)
    z, p = layer.circuit(x)
    y0, a0 = authors_iteration(z, p, 0)
    drive = (p.b * z) @ p.W_r.T
    torch.testing.assert_close(a0, (p.sigma * p.b0) ** 2 + drive**2 @ p.W.T)
    torch.testing.assert_close(y0, drive / a0.sqrt())
    with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
        authors_iteration(z, p, -1)
    with pytest.raises(ValueError, match="rectified"):
        authors_iteration(z, p._replace(rectified=True), 3)
    V = layer.V_r.detach().clone().requires_grad_()

    def output(V):
        return authors_iteration(z.detach(), p._replace(W_r=V / torch.linalg.matrix_norm(V, ord=2)), 4)[0]

    assert torch.autograd.gradcheck(output, (V,))


def test_sweeps_and_algorithm1_reach_the_same_fixed_point_and_gradient(monkeypatch):
    """Accelerated sweeps find the point where plain sweeps do not converge; Algorithm 1, when it takes over, finds
    the same point; the implicit gradient through either equals backpropagation through the converged iteration."""
    layer = _paper_layer()
    x = torch.rand(6, 10, dtype=torch.float64)
    with torch.no_grad():
        z, p = layer.circuit(x)
    y, a, stats = solve_fixed_point(z, p)
    assert stats.method == "sweep" and stats.absolute_residual < 1e-11
    y_ref, a_ref = unrolled_fixed_point(z, p, 200)
    torch.testing.assert_close((y, a), (y_ref, a_ref), rtol=1e-9, atol=1e-10)
    # W_r = -3 I: the plain sweep y <- b z - 3 (1 - sqrt(a)) y does not contract where (1 - sqrt(a)) > 1/3
    W_r = -3 * torch.eye(20, dtype=torch.float64, requires_grad=True)
    p = p._replace(W_r=W_r)
    with torch.no_grad():
        y, a = dn_fixed_point(z, p.b, p.b0, p.sigma, p.W)
        for _ in range(SWEEPS):
            y, a = sweep_update(y, a, z, p)
        assert bool((absolute_residual(y, a, z, p) > 0.1).all())  # SWEEPS plain sweeps: nowhere near
    w = torch.randn(6, 20, dtype=torch.float64)

    def gradient(y, a):
        return torch.autograd.grad((y * w).sum() + a.sum(), W_r)[0]

    unrolled = gradient(*unrolled_fixed_point(z, p, 200))
    for sweeps, method in ((SWEEPS, "sweep"), (1, "algorithm1")):  # one sweep: Algorithm 1 must finish
        monkeypatch.setattr(static, "SWEEPS", sweeps)
        y, a, stats = solve_fixed_point(z, p)
        assert stats.method == method and stats.absolute_residual < 1e-11
        torch.testing.assert_close((y, a), unrolled_fixed_point(z, p, 200), rtol=1e-9, atol=1e-10)
        y, a, solve = implicit_fixed_point(z, p)
        implicit = gradient(y, a)
        assert solve.method == method and not solve.adjoint_fallback and solve.adjoint_iterations >= 1
        torch.testing.assert_close(implicit, unrolled, rtol=1e-8, atol=1e-10)


def test_float32_adjoint_at_a_trained_layer_converges_through_y_and_a():
    """At the committed 50-unit run's trained layer, the float32 adjoint of a loss reaching the fixed point through
    ``a`` as well as ``y`` converges in a few dozen iterations (with a relative tolerance of 1e-6 it stalled near
    its rounding floor for over 100), and the gradient is float64's to float32 accuracy."""
    layer = load_model(Path(__file__).parents[1] / "results" / "static_mnist" / "organics-50").layers[0]
    codes = torch.rand(256, 40, generator=torch.Generator().manual_seed(0))  # the autoencoder's codes lie in (0, 1)
    gradients = {}
    for dtype in (torch.float64, torch.float32):
        layer = layer.to(dtype)
        layer.zero_grad()
        z, p = layer.circuit(codes.to(dtype))
        y, a, solve = implicit_fixed_point(z, p)
        (y.square().sum() + a.sum()).backward()
        assert not solve.adjoint_fallback
        if dtype == torch.float32:
            assert solve.method == "sweep" and solve.adjoint_iterations <= 50
        gradients[dtype] = layer.V_r.grad.double()
    scale = float(gradients[torch.float64].abs().max())
    assert float((gradients[torch.float32] - gradients[torch.float64]).abs().max()) < 1e-3 * scale


def _engines_gradients(layer: CircuitLayer, x: torch.Tensor, engine: str):
    """A layer's fixed point, its solve and the gradient of a loss through ``y`` and ``a``, solved by ``engine``."""
    params = [q for q in layer.parameters() if q.requires_grad]
    z, p = layer.circuit(x)
    y, a, solve = implicit_fixed_point(z, p, engine=engine)
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    grads = torch.autograd.grad((y * w).sum() + a.square().sum(), params)
    return (y.detach(), a.detach()), grads, solve


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 24), batch=st.integers(1, 9))
def test_numba_engine_equals_the_readable_sweeps_and_adjoint(seed, n, batch):
    """The compiled Anderson loop (forward sweeps and their adjoint) gives the readable one's fixed point and gradient
    for any float64 paper-era layer with a random unit-SN W_r (where the sweeps need mixing), and hands over to
    Algorithm 1 where the readable one does."""
    layer = _paper_layer(n=n, seed=seed)
    x = torch.rand(batch, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    try:
        ref_state, ref_grads, ref_solve = _engines_gradients(layer, x, "torch")
    except ConvergenceError:  # a few small layers have samples that no iteration brings to a fixed point
        with pytest.raises(ConvergenceError):
            _engines_gradients(layer, x, "numba")
        return
    state, grads, solve = _engines_gradients(layer, x, "numba")
    assert (solve.engine, ref_solve.engine) == ("numba", "torch")
    assert solve.method == ref_solve.method and solve.absolute_residual < 1e-11  # "algorithm1" after 30 slow sweeps
    assert not solve.adjoint_fallback and not ref_solve.adjoint_fallback
    torch.testing.assert_close(state, ref_state, rtol=1e-9, atol=1e-10)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()))


def test_numba_engine_at_a_trained_layer_in_float32():
    """At the committed 50-unit run's trained layer (slow sweeps: mixing over a dozen iterations), the compiled loop's
    float32 fixed point and gradient agree with the readable loop's to float32 accuracy, and the default engine on the
    CPU is the compiled one."""
    layer = load_model(Path(__file__).parents[1] / "results" / "static_mnist" / "organics-50").layers[0]
    codes = torch.rand(256, 40, generator=torch.Generator().manual_seed(1))
    (state, grads, solve), (ref_state, ref_grads, ref_solve) = (
        _engines_gradients(layer, codes, engine) for engine in ("auto", "torch")
    )
    assert solve.engine == "numba" and solve.iterations > 10 and solve.absolute_residual < 1e-5
    assert ref_solve.iterations > 10 and abs(solve.adjoint_iterations - ref_solve.adjoint_iterations) <= 5
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-4)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert float((g - ref).abs().max()) < 1e-4 * float(ref.abs().max())


def test_engine_choices():
    layer = _paper_layer(n=4)
    z, p = layer.circuit(torch.rand(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="engine must be one of"):
        solve_fixed_point(z, p, engine="fortran")
    with pytest.raises(ValueError, match="engine 'numba' needs numba and float32 or float64"):
        solve_fixed_point(z.half(), p, engine="numba")
    assert solve_fixed_point(z, p)[2].engine == "numba"
    assert solve_fixed_point(z, p, engine="torch")[2].engine == "torch"
    with pytest.raises(ValueError, match="engine must be one of"):
        CircuitLayer(10, 4, preset="paper", engine="fortran")
    layer.options = replace(layer.options, engine="torch")
    layer(torch.rand(3, 10, dtype=torch.float64))
    assert layer.last_solve.engine == "torch"


def test_without_numba_the_layers_fall_back_to_the_readable_loop():
    """numba is a dependency, but where it cannot be imported (a bare GPU host, a numpy it refuses) the package still
    imports, trains and reports the readable engine; asking for the compiled one is a clear error."""
    script = """
import sys
class NoNumba:
    def find_spec(self, name, path=None, target=None):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("numba is not installed")
sys.meta_path.insert(0, NoNumba())
import torch
from organics.networks import build_model
from organics.networks.static import solve_fixed_point
torch.manual_seed(0)
model = build_model("organics2", 30, 10, hidden_sizes=[6], preset="paper")
model(torch.rand(4, 30)).sum().backward()
assert model.layers[0].last_solve.engine == "torch", model.layers[0].last_solve
z, p = model.layers[0].circuit(torch.rand(3, 30))
try:
    solve_fixed_point(z.detach(), p, engine="numba")
except ValueError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "engine 'numba' needs numba" in result.stdout


def test_both_engines_treat_sweeps_that_overflow_alike():
    """Where the sweeps blow up (W_r = 1e30 I), neither loop raises anything but the solver's own error, and both
    leave the problem to Algorithm 1, which ends at the same point (their sweeps may stop at different iterates: a
    mixing step at that scale is ill-conditioned)."""
    layer = _paper_layer(n=5)
    with torch.no_grad():
        z, p = layer.circuit(torch.rand(4, 10, dtype=torch.float64))
    p = p._replace(W_r=1e30 * torch.eye(5, dtype=torch.float64))
    outcomes = []
    for engine in ("torch", "numba"):
        try:
            y, a, stats = solve_fixed_point(z, p, engine=engine)
            outcomes.append((stats.method, y, a))
        except ConvergenceError as error:
            outcomes.append(("ConvergenceError", str(error)))
    assert outcomes[0][0] == outcomes[1][0]
    if outcomes[0][0] != "ConvergenceError":
        torch.testing.assert_close(outcomes[0][1:], outcomes[1][1:], rtol=1e-9, atol=1e-10)
