"""organics: the ORGaNICs circuit, its stability analysis, and its training as a neural network.

Reference implementation for Rawat, Heeger & Martiniani, *Unconditional stability of a
recurrent neural circuit implementing divisive normalization* (NeurIPS 2024).
"""

from .layers import MLP, StaticORGaNICs
from .model import Circuit, CircuitTensors, dn_steady_state, drift
from .rnn import LSTMClassifier, ORGaNICsCell, ORGaNICsRNN
from .solver import (
    ConvergenceError,
    FixedPoint,
    Trajectory,
    fixed_point_by_simulation,
    integrate,
    iterate_fixed_point,
    simulate,
)

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "Circuit",
    "CircuitTensors",
    "ConvergenceError",
    "FixedPoint",
    "LSTMClassifier",
    "ORGaNICsCell",
    "ORGaNICsRNN",
    "StaticORGaNICs",
    "Trajectory",
    "dn_steady_state",
    "drift",
    "fixed_point_by_simulation",
    "integrate",
    "iterate_fixed_point",
    "simulate",
]
