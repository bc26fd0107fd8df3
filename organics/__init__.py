"""organics: the ORGaNICs circuit, its stability analysis, and its training as a neural network.

Reference implementation for Rawat, Heeger & Martiniani, *Unconditional stability of a
recurrent neural circuit implementing divisive normalization* (NeurIPS 2024).

Glossary (the names in the package follow it):

- **drift**: the right-hand side ``(dy/dt, da/dt)`` of the circuit's equations (:func:`drift`).
- **fixed point**: a state ``(y, a)`` where the drift vanishes; for ``W_r = I`` it is known in
  closed form, the **divisive-normalization (DN) fixed point** (:func:`dn_fixed_point`).
  "Steady state" is not used as a second name for it.
- **absolute residual**: max-norm of the drift at a state (:func:`absolute_residual`);
  **relative residual**: each equation's residual divided by its largest term
  (:func:`relative_residual`). A name says which one it holds.
- **time constant** ``tau`` (ms in the theory chapters): ``tau dx/dt = ...``; **step size**
  ``dt/tau``: the fraction of the drift one explicit Euler step of the RNN cell applies.
- **spectral abscissa**: largest real part of the Jacobian's eigenvalues; negative means locally
  stable.
- **experiment**: one of the paper's named training runs (:mod:`organics.experiments`).

Layout: the circuit maths at the root (:mod:`~organics.circuit`, :mod:`~organics.solver`,
:mod:`~organics.stability`, :mod:`~organics.oscillator`, :mod:`~organics.planar`,
:mod:`~organics.sampling`); trainable networks in :mod:`organics.networks`; data, runs,
experiments and the trainer in :mod:`~organics.data`, :mod:`~organics.runs`,
:mod:`~organics.experiments` and :mod:`organics.train`; the GPU relay and the benchmark in
:mod:`~organics.relay` and :mod:`~organics.benchmark`; slider explorers of precomputed figures
for static pages in :mod:`~organics.explorer`.
"""

from .circuit import Circuit, CircuitTensors, absolute_residual, dn_fixed_point, drift, relative_residual
from .networks import MLP, LSTMClassifier, ORGaNICsCell, ORGaNICsRNN, StaticORGaNICs
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
    "absolute_residual",
    "dn_fixed_point",
    "drift",
    "fixed_point_by_simulation",
    "integrate",
    "iterate_fixed_point",
    "relative_residual",
    "simulate",
]
