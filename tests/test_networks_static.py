"""Static ORGaNICs layers (fixed point as output, Algorithm 1 in torch), the MLP baseline and the model catalogue."""

import numpy as np
import pytest
import torch
from helpers import perturbed_layer, sample_of
from hypothesis import given, settings
from hypothesis import strategies as st

from organics.circuit import dn_fixed_point
from organics.networks import MODELS, build_model, count_parameters
from organics.networks.baselines import MLP
from organics.networks.static import (
    CircuitLayer,
    StaticORGaNICs,
    constrain_spectral_norm,
    fixed_point_residual,
    unrolled_fixed_point,
)
from organics.solver import iterate_fixed_point


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
    assert set(MODELS) == {"organics2", "mlp", "organics_rnn", "lstm"}
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
