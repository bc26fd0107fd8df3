"""organics: the ORGaNICs circuit, its stability analysis, and its training as a neural network.

Reference implementation for Rawat, Heeger & Martiniani, *Unconditional stability of a
recurrent neural circuit implementing divisive normalization* (NeurIPS 2024).
"""

from .model import Circuit, CircuitTensors, dn_steady_state, drift
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
    "Circuit",
    "CircuitTensors",
    "ConvergenceError",
    "FixedPoint",
    "Trajectory",
    "dn_steady_state",
    "drift",
    "fixed_point_by_simulation",
    "integrate",
    "iterate_fixed_point",
    "simulate",
]
