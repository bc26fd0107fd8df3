"""Trainable networks built on the ORGaNICs circuit, their baselines, and their stability.

- :mod:`~organics.networks.cell`: the readable one-step ORGaNICs cell (sequential MNIST);
- :mod:`~organics.networks.scan`: the fast whole-sequence path of the same cell;
- :mod:`~organics.networks.rnn`: the sequence classifier, choosing between the two;
- :mod:`~organics.networks.static`: static ORGaNICs layers (fixed point as output) and Algorithm 1 in torch;
- :mod:`~organics.networks.baselines`: MLP and LSTM;
- :mod:`~organics.networks.ssn`: stabilised supralinear networks (E/I, steady state by simulation), Table 1's SSN rows;
- :mod:`~organics.networks.stability`: stability of trained networks, built on :mod:`organics.stability`.

Every model is built the same way, ``MODELS[name](input_size=..., num_classes=..., **kwargs)``
(:func:`build_model` adds a clear error for unknown names and arguments).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._checks import check_choice
from .baselines import MLP, LSTMClassifier
from .cell import CellState, ORGaNICsCell
from .rnn import ORGaNICsRNN
from .scan import RNNTrajectory, organics_scan
from .ssn import SSNClassifier, SSNLayer
from .static import CircuitLayer, CircuitState, StaticORGaNICs

__all__ = [
    "MODELS",
    "CellState",
    "CircuitLayer",
    "CircuitState",
    "LSTMClassifier",
    "MLP",
    "ORGaNICsCell",
    "ORGaNICsRNN",
    "RNNTrajectory",
    "SEQUENCE_MODELS",
    "SSNClassifier",
    "SSNLayer",
    "StaticORGaNICs",
    "build_model",
    "count_parameters",
    "organics_scan",
    "parameter_table",
]

MODELS: dict[str, type[nn.Module]] = {
    "organics2": StaticORGaNICs,
    "mlp": MLP,
    "organics_rnn": ORGaNICsRNN,
    "lstm": LSTMClassifier,
    "ssn": SSNClassifier,
}
"""The trainable models by name; each takes ``input_size``, ``num_classes`` and its own keyword arguments."""

SEQUENCE_MODELS = frozenset({"organics_rnn", "lstm"})
"""The models of :data:`MODELS` that read sequences ``(B, T, features)`` (the sequential tasks); the others, images."""


def build_model(name: str, input_size: int, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """``MODELS[name](input_size=input_size, num_classes=num_classes, **kwargs)``.

    Raises
    ------
    ValueError
        If ``name`` is not in :data:`MODELS`, or ``kwargs`` holds an argument the model does not
        take or a value it refuses (the message starts with "model_kwargs").
    """
    check_choice("model", name, sorted(MODELS))
    try:
        return MODELS[name](input_size=input_size, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model_kwargs for {name!r}: {err}") from err


def count_parameters(model: nn.Module) -> int:
    """Number of learned scalars (the paper's Table 2 column "# params")."""
    return sum(p.numel() for p in model.parameters())


def parameter_table(model: nn.Module) -> str:
    """A plain-text table of a model's parameters: name, shape, count, and the total (cf. Table 2)."""
    rows = [(name, "x".join(map(str, p.shape)), p.numel()) for name, p in model.named_parameters()]
    width = max([len(r[0]) for r in rows] + [len("total")])
    lines = [f"{'parameter':<{width}}  {'shape':>10}  {'count':>8}"]
    lines += [f"{name:<{width}}  {shape:>10}  {count:>8,}" for name, shape, count in rows]
    lines.append(f"{'total':<{width}}  {'':>10}  {count_parameters(model):>8,}")
    return "\n".join(lines)
