"""Stabilised supralinear networks: Dale's law, steady state, implicit gradient, counted failures, training record."""

import json

import pytest
import torch

from organics.experiments import EXPERIMENTS
from organics.networks import MODELS, build_model, count_parameters
from organics.networks.ssn import SSNClassifier, SSNLayer, simulate, ssn_drift, steady_state
from organics.train import TrainConfig, train


def _layer(excitatory: int = 4, inhibitory: int = 3, input_size: int = 5, seed: int = 0, **kw) -> SSNLayer:
    torch.manual_seed(seed)
    return SSNLayer(input_size, excitatory, inhibitory, **kw).double()


def _dale_holds(layer: SSNLayer) -> bool:
    W = layer.W.detach()
    return bool((W[:, : layer.excitatory] >= 0).all() and (W[:, layer.excitatory :] <= 0).all())


def test_dale_law_holds_at_initialisation_and_after_an_optimizer_step():
    layer = _layer(8, 2)
    assert _dale_holds(layer) and (layer.W[:, :8] > 0).any() and (layer.W[:, 8:] < 0).any()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1.0)  # steps large enough to flip the signs of V
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.rand(6, 5, dtype=torch.float64)).sum().mul(-1).backward()
        optimizer.step()
        assert _dale_holds(layer)
    assert (layer.V < 0).any()  # V itself changed sign somewhere; W = |V| S did not


def test_converged_steady_state_satisfies_the_fixed_point_equation():
    layer = _layer()
    x = torch.rand(16, 5, dtype=torch.float64)
    with torch.no_grad():
        state = layer.steady_state(x)
        h = layer.W_in(x)
    assert state.converged.all() and not state.diverged.any()
    assert (state.r >= 0).all() and (state.r > 0).any()
    fixed_point = layer.k * torch.relu(state.r @ layer.W.detach().T + h) ** 2
    scale = state.r.abs().amax(-1, keepdim=True)
    assert ((state.r - fixed_point).abs() <= 1e-10 * scale).all()  # the default float64 tolerance, relative
    steps = int(state.steps.max())
    assert layer.failures == {"forward_passes": 1, "samples": 16, "not_converged": 0, "diverged": 0, "steps": steps}
    assert layer.pop_failures()["samples"] == 16 and layer.failures["samples"] == 0


def test_implicit_gradient_matches_finite_differences_and_the_unrolled_simulation():
    layer = _layer()
    h = (layer.W_in(torch.rand(2, 5, dtype=torch.float64)) + 0.5).detach().requires_grad_()
    W = layer.W.detach().requires_grad_()
    k = layer.k.clone().requires_grad_()

    def rates(h, W, k):
        return steady_state(h, W, k, layer.tau, dt=4.0, tol=1e-12, max_steps=5000).r

    assert torch.autograd.gradcheck(rates, (h, W, k), eps=1e-6, atol=1e-6, rtol=1e-5)
    # backpropagation through the Euler steps themselves, run long enough to settle
    weights = torch.randn(2, 7, dtype=torch.float64)
    r = torch.zeros_like(h)
    for _ in range(1000):
        r = r + 4.0 / layer.tau * ssn_drift(r, h, W, k)
    unrolled = torch.autograd.grad((weights * r).sum(), (h, W, k))
    implicit = torch.autograd.grad((weights * rates(h, W, k)).sum(), (h, W, k))
    for a, b in zip(implicit, unrolled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_unstable_layer_is_counted_as_diverged_and_keeps_gradients_finite():
    layer = _layer()
    x = torch.rand(8, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.V[:, : layer.excitatory] *= 100.0  # runaway excitation
        layer.W_in.bias.fill_(1.0)
    out = layer(x)
    assert layer.failures["diverged"] == 8 and layer.failures["not_converged"] == 0
    assert torch.isfinite(out).all() and out.abs().max() <= 1e3
    out.sum().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all((g == 0).all() for g in grads)  # no steady state, no gradient into the SSN


def test_failed_samples_get_no_gradient_and_do_not_poison_the_batch():
    layer = _layer(max_steps=5)  # too few steps: nobody converges
    x = torch.rand(4, 5, dtype=torch.float64)
    layer(x).sum().backward()
    assert layer.failures["not_converged"] == 4 and layer.failures["diverged"] == 0
    assert (layer.V.grad == 0).all()
    h = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    W = torch.tensor([[50.0, 0.0], [0.0, 0.1]], dtype=torch.float64, requires_grad=True)
    h_mixed = h * torch.tensor([[1.0], [0.0]], dtype=torch.float64)  # sample 0 blows up, sample 1 is silent
    state = steady_state(h_mixed, W, torch.tensor(0.3, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert state.diverged.tolist() == [True, False] and state.converged.tolist() == [False, True]
    state.r.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()


def test_simulate_stops_each_sample_at_its_own_convergence():
    layer = _layer()
    h = torch.stack([torch.full((7,), -1.0), torch.full((7,), 0.8)]).double()
    state = simulate(h, layer.W.detach(), 0.3, layer.tau, dt=1.0, tol=1e-10, max_steps=5000, max_rate=1e3)
    assert state.converged.all() and state.steps[0] == 0 and state.steps[1] > 0  # no input: r = 0 at once
    assert (state.r[0] == 0).all()


def test_build_model_registers_both_ratios_with_the_autoencoder_front_end():
    assert MODELS["ssn"] is SSNClassifier
    for (e, i), count in {(50, 50): 676_874, (80, 20): 677_174}.items():
        model = build_model("ssn", 784, 10, excitatory=e, inhibitory=i, front_end="autoencoder")
        assert count_parameters(model) == count
        logits = model(torch.rand(3, 784))
        assert logits.shape == (3, 10) and model.auxiliary_loss is not None
        assert model.pop_diagnostics()["samples"] == 3
    with pytest.raises(ValueError, match="model_kwargs.*input_size"):
        build_model("ssn", 196, 10, front_end="autoencoder")
    with pytest.raises(ValueError, match="tau_e"):
        build_model("ssn", 196, 10, tau_e=0)
    with pytest.raises(ValueError, match="inhibitory must be an integer"):
        SSNLayer(4, 3, 1.5)
    W, k, tau = torch.eye(2), torch.tensor(0.3), torch.ones(2)
    for kwargs, name in (({"dt": -1.0}, "dt"), ({"tol": -1.0}, "tol"), ({"max_steps": 0}, "max_steps"),
                         ({"max_rate": float("inf")}, "max_rate")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} must be"):
            steady_state(torch.rand(2, 2), W, k, tau, **kwargs)
    with pytest.raises(ValueError, match="h must have shape"):
        steady_state(torch.rand(0, 2), W, k, tau)
    assert build_model("ssn", 3, 4)(torch.rand(2, 3)).shape == (2, 4)  # images straight in by default
    for name, paper in (("static/ssn-50-50", 94.9), ("static/ssn-80-20", 95.2)):
        cfg = EXPERIMENTS[name].config()
        assert (cfg.model, cfg.epochs, cfg.lr, cfg.step_size, cfg.seed, cfg.monitor) == (
            "ssn",
            200,
            1e-3,
            100,
            73,
            False,
        )
        assert EXPERIMENTS[name].paper_accuracy == paper


def test_training_writes_the_failure_counters_into_the_metrics(tmp_path):
    cfg = TrainConfig(
        model="ssn",
        model_kwargs={"excitatory": 8, "inhibitory": 4, "front_end": "none"},
        epochs=1,
        batch_size=64,
        limit_train=128,
        limit_test=64,
        image_size=14,
        out_dir=str(tmp_path / "ssn"),
        device="cpu",
        progress=False,
    )
    results = train(cfg)
    untrained, epoch = results.epochs
    assert epoch["train_diagnostics"]["samples"] == 128 and epoch["train_diagnostics"]["forward_passes"] == 2
    validation = 128 * 3000 // 57000  # load_mnist shrinks the validation split in proportion
    assert untrained["eval_diagnostics"]["samples"] == epoch["eval_diagnostics"]["samples"] == validation + 64
    lines = [json.loads(line) for line in (tmp_path / "ssn" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["train_diagnostics"] == epoch["train_diagnostics"]
    assert set(epoch["train_diagnostics"]) == {"forward_passes", "samples", "not_converged", "diverged", "steps"}
