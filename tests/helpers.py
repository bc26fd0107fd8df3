"""The tests' shared catalogue of circuits, layers and networks (one definition each)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from hypothesis import strategies as st

from organics.circuit import Circuit
from organics.networks import ORGaNICsCell, ORGaNICsRNN
from organics.networks.cell import cell_options
from organics.networks.static import CircuitLayer, CircuitState


def random_circuit(rng: np.random.Generator, n: int, **kw) -> Circuit:
    """A W_r = I circuit with moderate per-neuron parameters and a sparse W (density 0.7)."""
    return Circuit(
        W=rng.uniform(0, 1, (n, n)) * (rng.uniform(size=(n, n)) < 0.7),
        b=rng.uniform(0.05, 1, n),
        b0=rng.uniform(0.05, 2, n),
        sigma=rng.uniform(0.01, 2, n),
        tau_y=rng.uniform(0.5, 20, n),
        tau_a=rng.uniform(0.5, 20, n),
        **kw,
    )


@st.composite
def identity_circuits(draw):
    """Admissible W_r = I circuits and inputs, parameters spread over decades (tau_a/tau_y in 1e-3..1e3)."""
    n = draw(st.integers(1, 40))
    tau_y = 10 ** draw(st.floats(-1, 1))
    tau_a = tau_y * 10 ** draw(st.floats(-3, 3))
    b = draw(st.floats(1e-3, 1.0))
    b0 = 10 ** draw(st.floats(-2, 1))
    sigma = 10 ** draw(st.floats(-3, 1))
    w_scale = 10 ** draw(st.floats(-2, 2))
    density = draw(st.floats(0, 1))
    z_scale = 10 ** draw(st.floats(-2, 2))
    rectified = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W = w_scale / n * rng.uniform(size=(n, n)) * (rng.uniform(size=(n, n)) <= density)
    z = z_scale * rng.standard_normal(n)
    circuit = Circuit(W, b=b, b0=b0, sigma=sigma, tau_y=tau_y, tau_a=tau_a, rectified=rectified)
    return circuit, z


def perturbed_layer(input_size: int = 12, hidden_size: int = 6, scale: float = 0.3, seed: int = 0) -> CircuitLayer:
    """A float64 static layer with a learned, non-trivial W_r and spread-out parameters."""
    torch.manual_seed(seed)
    n = hidden_size
    layer = CircuitLayer(input_size, n).double()
    with torch.no_grad():
        layer.V_r.add_(scale * torch.randn(n, n, dtype=torch.float64))
        layer.log_W.add_(0.5 * torch.randn(n, n, dtype=torch.float64))
        layer.log_sigma.add_(0.3 * torch.randn(n, dtype=torch.float64))
        layer.b0_logit.add_(torch.randn(n, dtype=torch.float64))
    return layer


def sample_of(state: CircuitState, i: int, tau: float = 2.0) -> Circuit:
    """Sample ``i`` of a layer's batched circuit as a NumPy :class:`Circuit` (time constants ``tau``)."""
    p = state.p
    return Circuit(
        W=p.W.detach().numpy(),
        b=p.b[i].detach().numpy(),
        b0=p.b0.detach().numpy(),
        sigma=p.sigma.detach().numpy(),
        tau_y=tau,
        tau_a=tau,
        W_r=p.W_r.detach().numpy(),
    )


def perturbed_cell(n: int = 6, input_size: int = 2, seed: int = 0, preset: str = "original", **options) -> ORGaNICsCell:
    """A float64 cell whose parameters are all moved away from their initial values (so every term matters)."""
    torch.manual_seed(seed)
    cell = ORGaNICsCell(input_size, n, cell_options(preset, **options)).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return cell


def perturbed_rnn(
    dtype: torch.dtype, n: int = 6, input_size: int = 2, seed: int = 0, preset: str = "original", **options
) -> ORGaNICsRNN:
    """An RNN with every parameter moved away from its initialisation (so every gradient term is exercised)."""
    torch.manual_seed(seed)
    model = ORGaNICsRNN(input_size, n, 3, preset=preset, **options).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.cell.p_y.add_(4.0)  # larger steps of y: the recurrence matters more within a short sequence
    return model


_HOLD = """
import sys, time
from organics.runs import RunDirectory
held = RunDirectory(sys.argv[1]).lock()
print(1, flush=True)
time.sleep(3600)  # until the block ends and kills it
"""


@contextmanager
def locked_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """A second process holding the run lock of ``folder`` for as long as the block runs."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        yield holder
    finally:
        holder.kill()
        holder.wait()
