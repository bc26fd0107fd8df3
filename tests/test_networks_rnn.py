"""ORGaNICs as an RNN: the cell is one explicit Euler step of the circuit, the classifier runs it over a sequence."""

import math

import numpy as np
import pytest
import torch
from helpers import perturbed_cell
from hypothesis import given, settings
from hypothesis import strategies as st

from organics.circuit import CircuitTensors, drift, relu
from organics.networks import build_model, count_parameters, parameter_table
from organics.networks.baselines import LSTMClassifier
from organics.networks.cell import TAU_MAX, ORGaNICsCell, cell_options
from organics.networks.rnn import ORGaNICsRNN, classify_together


@pytest.mark.parametrize("rectified", [False, True])
def test_cell_is_an_euler_step_of_the_circuit(rectified):
    cell = perturbed_cell(rectified=rectified)
    B, n = 4, cell.hidden_size
    x = torch.randn(B, cell.input_size, dtype=torch.float64)
    y, a = torch.randn(B, n, dtype=torch.float64), torch.rand(B, n, dtype=torch.float64)
    b, b0 = torch.rand(B, n, dtype=torch.float64), torch.rand(B, n, dtype=torch.float64)
    new = cell(x, (y, a, b, b0))

    W = torch.exp(cell.log_W).clamp(0, 1)
    sigma = torch.exp(cell.log_sigma)
    one = torch.ones((), dtype=torch.float64)
    f_y, f_a = drift(y, a, relu(x @ cell.W_zx.T), CircuitTensors(b, b0, sigma, one, one, W, cell.W_r, rectified))
    dt = {k: TAU_MAX[k] * torch.sigmoid(getattr(cell, f"p_{k}")) for k in TAU_MAX}
    drive_b = torch.sigmoid(x @ cell.W_bx.T + cell.c_b + y @ cell.W_by.T + a @ cell.W_ba.T)
    drive_b0 = torch.sigmoid(x @ cell.W_b0x.T + cell.c_b0 + y @ cell.W_b0y.T + a @ cell.W_b0a.T)
    torch.testing.assert_close(new.y, y + dt["y"] * f_y, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(new.a, a + dt["a"] * f_a, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(new.b, b + dt["b"] * (drive_b - b), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(new.b0, b0 + dt["b0"] * (drive_b0 - b0), rtol=1e-14, atol=1e-14)


def test_initial_state_rests_without_input():
    cell = perturbed_cell()
    y, a, b, b0 = cell.initial_state(3)
    assert torch.all(y == 0) and torch.all(b == 0.5) and torch.all(b0 == 0.5)
    one = torch.ones((), dtype=torch.float64)
    _, f_a = drift(y, a, torch.zeros_like(y), CircuitTensors(b, b0, cell.sigma, one, one, cell.W, cell.W_r, False))
    torch.testing.assert_close(f_a, torch.zeros_like(f_a), rtol=0, atol=1e-15)


def test_step_sizes_are_bounded_by_tau_max():
    cell = perturbed_cell()
    with torch.no_grad():
        cell.p_y.fill_(50.0)
        cell.p_a.fill_(-50.0)
    dt_y, dt_a, dt_b, dt_b0 = cell.step_sizes()
    assert torch.all(dt_y <= TAU_MAX["y"]) and torch.all(dt_a > 0) and torch.all(dt_a < 1e-20)
    assert torch.all((dt_b > 0) & (dt_b < TAU_MAX["b"])) and torch.all((dt_b0 > 0) & (dt_b0 < TAU_MAX["b0"]))


@pytest.mark.parametrize("impl", ["loop", "scan"])
@pytest.mark.parametrize("rectified", [False, True])
@pytest.mark.parametrize("T", [1, 5])
def test_classifier_shapes_and_trajectory(impl, rectified, T):
    torch.manual_seed(0)
    model = ORGaNICsRNN(input_size=3, hidden_size=7, num_classes=4, rectified=rectified, impl=impl)
    x = torch.rand(2, T, 3)
    logits, trajectory = model(x, return_trajectory=True)
    assert logits.shape == (2, 4) and model(x).shape == (2, 4)
    assert trajectory.y.shape == trajectory.a.shape == (2, T, 7)
    y, _ = model.run(x)
    torch.testing.assert_close(trajectory.y[:, -1], y)
    torch.testing.assert_close(logits, model.readout(y))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rectified=st.booleans(), scale=st.floats(0.0, 20.0))
def test_modulators_stay_positive(seed, rectified, scale):
    """a_{t+1} >= (1 - dt_a) a_t + dt_a (sigma b0)^2 > 0: the scan's backward pass relies on it."""
    cell = perturbed_cell(n=5, input_size=1, rectified=rectified, seed=seed % 1000)
    model = ORGaNICsRNN(1, 5, 3, impl="loop").double()
    model.cell = cell
    x = scale * torch.randn(3, 40, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, trajectory = model.run(x, return_trajectory=True)
    assert torch.all(trajectory.a > 0)


def test_bad_inputs_raise_value_error_naming_the_parameter():
    model = ORGaNICsRNN(input_size=2, hidden_size=3)
    for bad in (torch.rand(4, 2), torch.rand(4, 5, 3), torch.rand(4, 0, 2), torch.rand(0, 5, 2)):
        with pytest.raises(ValueError, match="x"):
            model(bad)
    with pytest.raises(ValueError, match="impl"):
        ORGaNICsRNN(impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        ORGaNICsRNN(input_size=2, hidden_size=3, impl="scan")(torch.rand(1, 2, 2).half())
    with pytest.raises(ValueError, match="hidden_size"):
        ORGaNICsRNN(hidden_size=0)
    with pytest.raises(ValueError, match="input_size"):
        ORGaNICsCell(0, 3)
    with pytest.raises(ValueError, match="num_classes"):
        ORGaNICsRNN(num_classes=0)
    for bad in (2.5, True, None):  # sizes are integers: a float or a bool is not quietly truncated
        with pytest.raises(ValueError, match="hidden_size must be an integer >= 1"):
            ORGaNICsCell(3, bad)
    with pytest.raises(ValueError, match="x"):
        LSTMClassifier(2, 3, 4)(torch.rand(4, 5, 3))


def test_parameter_count_matches_the_formula():
    n, c = 128, 10
    model = ORGaNICsRNN(input_size=1, hidden_size=n, num_classes=c)
    # 3 input weights, 2 gain biases, 6 (n, n) matrices (4 gain, W_r, W), sigma, 4 step sizes, readout
    expected = 3 * n + 2 * n + 6 * n * n + n + 4 * n + n * c + c
    assert count_parameters(model) == expected == 100_874
    lstm = LSTMClassifier(1, n, c)
    assert count_parameters(lstm) == 4 * n * (1 + n + 2) + n * c + c
    table = parameter_table(model)
    assert table.splitlines()[-1].split()[-1] == f"{expected:,}"


def test_w_r_is_initialised_orthogonal_and_w_is_a_pooling():
    cell = ORGaNICsCell(1, 16)
    eye = torch.eye(16)
    torch.testing.assert_close(cell.W_r @ cell.W_r.T, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(cell.W, torch.full((16, 16), 1 / 16))
    assert math.isclose(float(cell.sigma[0].detach()), 0.1, rel_tol=1e-6)


def test_models_are_registered():
    model = build_model("organics_rnn", input_size=1, num_classes=10, hidden_size=8, rectified=True, impl="loop")
    assert isinstance(model, ORGaNICsRNN) and model.cell.rectified and model.impl == "loop"
    assert model.cell.hidden_size == 8 and model(torch.rand(2, 3, 1)).shape == (2, 10)
    lstm = build_model("lstm", input_size=1, num_classes=10, hidden_size=8)
    assert isinstance(lstm, LSTMClassifier) and lstm(torch.rand(2, 3, 1)).shape == (2, 10)


def spec_step(cell, x, y, a, b1, b0):
    """The paper-era update written from the spec's equations (shared/spec/organics.md, section 3.1), in NumPy."""
    P = {name: t.detach().numpy() for name, t in [*cell.named_parameters(), *cell.named_buffers()]}

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    def relu_(v):
        return np.maximum(v, 0)

    V = P["V_r"]
    W_r = np.eye(len(V)) + V / np.linalg.svd(V, compute_uv=False)[0]
    W = np.exp(P["log_W"])
    sigma = np.exp(P["log_sigma"])
    dt = {k: TAU_MAX[k] * sigmoid(P[f"p_{k}"]) for k in TAU_MAX}
    z = x @ P["W_zx"].T
    B1 = sigmoid(x @ P["W_bx"].T + y @ P["W_by"].T + a @ P["W_ba"].T)
    B0 = sigmoid(x @ P["W_b0x"].T + y @ P["W_b0y"].T + a @ P["W_b0a"].T)
    y_new = y + dt["y"] * (-y + b1 * z + (1 - np.sqrt(relu_(a))) * (relu_(y) @ W_r.T))
    a_new = a + dt["a"] * (-a + sigma**2 * b0**2 + (relu_(y) ** 2 * relu_(a)) @ W.T)
    return y_new, a_new, b1 + dt["b"] * (-b1 + B1), b0 + dt["b0"] * (-b0 + B0)


@pytest.mark.parametrize("step_sizes", ["learned_normal", "fixed"])
@pytest.mark.parametrize("T", [1, 20])
def test_paper_preset_follows_the_spec_update_equations(step_sizes, T):
    cell = perturbed_cell(n=5, input_size=1, preset="paper", step_sizes=step_sizes)
    x = torch.rand(3, T, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    state = [v.detach().numpy() for v in cell.initial_state(3)]
    for t in range(T):
        state = spec_step(cell, x[:, t].numpy(), *state)
    for impl in ("loop", "scan"):
        model = ORGaNICsRNN(1, 5, 2, preset="paper", step_sizes=step_sizes, impl=impl).double()
        model.cell = cell
        with torch.no_grad():
            y, trajectory = model.run(x, return_trajectory=True)
        np.testing.assert_allclose(y.numpy(), state[0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(trajectory.a[:, -1].numpy(), state[1], rtol=1e-13, atol=1e-15)


def test_paper_preset_initialisation():
    torch.manual_seed(0)
    n = 32
    cell = ORGaNICsCell(1, n, cell_options("paper"))
    torch.testing.assert_close(cell.W_r, 2 * torch.eye(n))
    W = cell.W.detach()
    assert torch.all(W.diagonal() == 1) and W.min() >= math.exp(-1) and W.max() <= 1
    assert torch.linalg.matrix_norm(cell.W_zx.detach(), ord=2).item() == pytest.approx(1.0)
    torch.testing.assert_close(cell.sigma, torch.ones(n))
    y, a, b, b0 = cell.initial_state(2)
    assert torch.equal(y[0], y[1]) and torch.linalg.vector_norm(y[0]).item() == pytest.approx(1.0)
    assert torch.all((y >= 0) & (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)) and torch.all(b0 == 1)
    learned = dict(cell.named_parameters())
    assert not {"log_sigma", "c_b", "c_b0"} & learned.keys() and "log_sigma" in dict(cell.named_buffers())
    assert cell.p_y.std() > 0.5  # p ~ N(0, 1)
    fixed = ORGaNICsCell(1, n, cell_options("paper", step_sizes="fixed"))
    assert torch.all(fixed.p_y == 1) and "p_y" not in dict(fixed.named_parameters())


def test_identity_plus_sn_keeps_the_distance_to_the_identity_at_one():
    cell = perturbed_cell(n=7, preset="paper")
    with torch.no_grad():
        cell.V_r.mul_(40.0).add_(torch.randn(7, 7, dtype=torch.float64))
    assert torch.linalg.matrix_norm(cell.W_r - torch.eye(7, dtype=torch.float64), ord=2).item() == pytest.approx(1.0)


@pytest.mark.parametrize(("n", "paper"), [(128, 100_000), (64, 26_000)])
def test_paper_preset_parameter_counts_match_table_2(n, paper):
    learned = count_parameters(ORGaNICsRNN(1, n, 10, preset="paper"))
    fixed = count_parameters(ORGaNICsRNN(1, n, 10, preset="paper", step_sizes="fixed"))
    assert learned == 3 * n + 6 * n * n + 4 * n + 10 * n + 10 and fixed == learned - 4 * n
    assert round(learned, -3) == paper  # the paper's "100k" and "26k"
    assert round(fixed + 4 * n, -3) == paper  # its fixed-time-constant rows count the 4n fixed step-size parameters


def test_cell_options_are_checked():
    with pytest.raises(ValueError, match="preset"):
        cell_options("nope")
    with pytest.raises(ValueError, match="unknown cell options"):
        cell_options(recurence="free")
    with pytest.raises(ValueError, match="recurrence"):
        cell_options(recurrence="orthogonal")
    with pytest.raises(ValueError, match="sigma"):
        ORGaNICsRNN(sigma=0.0)


@pytest.mark.parametrize("streams", [False, True])
def test_models_classified_together_equal_models_called_alone(streams):
    """ORGaNICs RNNs of two sizes (two of one size share a scan call) and an LSTM, each on its own batch: logits and
    gradients are those of separate calls; on the CPU, ``streams`` changes nothing."""
    torch.manual_seed(0)
    models = [
        ORGaNICsRNN(1, 6, 10, preset="paper", impl="scan"),
        ORGaNICsRNN(1, 4, 10, preset="paper", impl="scan"),
        LSTMClassifier(1, 5, 10),
        ORGaNICsRNN(1, 6, 10, preset="paper", impl="scan"),
    ]
    models = [m.double() for m in models]
    xs = [torch.rand(3, 9, 1, dtype=torch.float64) for _ in models]

    def outputs(forward):
        for model in models:
            model.zero_grad(set_to_none=True)
        logits = forward()
        sum(z.square().sum() for z in logits).backward()
        return [z.detach() for z in logits] + [p.grad.clone() for m in models for p in m.parameters()]

    alone = outputs(lambda: [model(x) for model, x in zip(models, xs, strict=True)])
    together = outputs(lambda: classify_together(models, xs, streams=streams))
    for mine, theirs in zip(together, alone, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
