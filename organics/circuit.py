"""The ORGaNICs circuit: parameters, drift and its divisive-normalization fixed point.

Main model (elementwise products, ``x+ = max(x, 0)``)::

    tau_y dy/dt = -y + b z + (1 - sqrt(a+)) (W_r y)
    tau_a da/dt = -a + (sigma b0)^2 + W (a+ y^2)

Rectified model (Eq. 102 of the paper's appendix)::

    tau_y dy/dt = -y + b z + (1 - sqrt(a+)) (W_r y+)
    tau_a da/dt = -a + (sigma b0)^2 + W (a+ (y+)^2)

The functions here are written once for both NumPy arrays and (batched) torch tensors:
the leading dimensions of ``y``, ``a`` and ``z`` are batch dimensions, the last one
indexes neurons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Circuit",
    "CircuitTensors",
    "absolute_residual",
    "relative_residual",
    "drift",
    "dn_fixed_point",
    "relu",
]


def relu(x: Any) -> Any:
    """Rectification ``x+ = max(x, 0)`` for a NumPy array or a torch tensor."""
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, min=0)
    return np.maximum(x, 0)


def _sqrt(x: Any) -> Any:
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else np.sqrt(x)


def _positive_vector(name: str, value: ArrayLike, n: int, *, upper: float | None = None) -> NDArray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr}")
    if np.any(arr <= 0):
        raise ValueError(f"{name} must be > 0, got min {arr.min():g}")
    if upper is not None and np.any(arr > upper):
        raise ValueError(f"{name} must be <= {upper:g}, got max {arr.max():g}")
    return arr


def _square_matrix(name: str, value: ArrayLike, n: int) -> NDArray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


_TINY = float(np.finfo(np.float64).tiny)


class CircuitTensors(NamedTuple):
    """A :class:`Circuit`'s parameters as torch tensors (see :meth:`Circuit.tensors`)."""

    b: torch.Tensor
    b0: torch.Tensor
    sigma: torch.Tensor
    tau_y: torch.Tensor
    tau_a: torch.Tensor
    W: torch.Tensor
    W_r: torch.Tensor
    rectified: bool


@dataclass(frozen=True)
class Circuit:
    """An n-dimensional ORGaNICs circuit (n principal neurons y, n modulators a).

    Parameters
    ----------
    W : array_like, shape (n, n)
        Normalization weights, elementwise ``W >= 0``. Fixes the dimension n.
    b : float or array_like, shape (n,)
        Input gain, ``0 < b <= 1``.
    b0 : float or array_like, shape (n,)
        Normalization gain, ``b0 > 0``.
    sigma : float or array_like, shape (n,)
        Semi-saturation constant, ``sigma > 0``.
    tau_y, tau_a : float or array_like, shape (n,)
        Time constants of y and a (ms), ``> 0``.
    W_r : array_like, shape (n, n), optional
        Recurrent weights; the identity if omitted.
    rectified : bool
        Use the rectified model (Eq. 102) instead of the main model.

    Raises
    ------
    ValueError
        Naming the offending parameter when a value is out of range, not finite, or of
        the wrong shape.
    """

    W: NDArray
    b: NDArray = field(default=0.5)  # type: ignore[assignment]
    b0: NDArray = field(default=0.5)  # type: ignore[assignment]
    sigma: NDArray = field(default=0.1)  # type: ignore[assignment]
    tau_y: NDArray = field(default=2.0)  # type: ignore[assignment]
    tau_a: NDArray = field(default=2.0)  # type: ignore[assignment]
    W_r: NDArray | None = None
    rectified: bool = False

    def __post_init__(self) -> None:
        W = np.asarray(self.W, dtype=np.float64)
        if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] < 1:
            raise ValueError(f"W must be a square matrix of at least one neuron, got shape {W.shape}")
        n = W.shape[0]
        W = _square_matrix("W", W, n)
        if np.any(W < 0):
            raise ValueError(f"W must be elementwise >= 0, got min {W.min():g}")
        W_r = np.eye(n) if self.W_r is None else _square_matrix("W_r", self.W_r, n)
        set_ = object.__setattr__
        set_(self, "W", W)
        set_(self, "W_r", W_r)
        set_(self, "b", _positive_vector("b", self.b, n, upper=1.0))
        for name in ("b0", "sigma", "tau_y", "tau_a"):
            set_(self, name, _positive_vector(name, getattr(self, name), n))
        if not isinstance(self.rectified, bool | np.bool_):
            raise ValueError(f"rectified must be True or False, got {self.rectified!r}")
        set_(self, "rectified", bool(self.rectified))

    @property
    def n(self) -> int:
        """Number of principal neurons (the circuit has 2n state variables)."""
        return self.W.shape[0]

    @property
    def identity_recurrence(self) -> bool:
        """Whether ``W_r`` is the identity matrix (the case of the stability theorem)."""
        return bool(np.array_equal(self.W_r, np.eye(self.n)))

    def check_input(self, z: ArrayLike) -> NDArray:
        """Return ``z`` as a float64 array after checking its shape ``(..., n)`` and finiteness."""
        z = np.asarray(z, dtype=np.float64)
        if z.ndim == 0 or z.shape[-1] != self.n:
            raise ValueError(f"z must have shape (..., {self.n}), got shape {z.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError("z must be finite (no NaN or inf)")
        return z

    def tensors(self, dtype: torch.dtype = torch.float64, device: Any = None) -> CircuitTensors:
        """The parameters as torch tensors, for batched integration with :func:`drift`."""

        def t(x: NDArray) -> torch.Tensor:
            return torch.as_tensor(x, dtype=dtype, device=device)

        return CircuitTensors(
            t(self.b),
            t(self.b0),
            t(self.sigma),
            t(self.tau_y),
            t(self.tau_a),
            t(self.W),
            t(self.W_r),
            self.rectified,
        )

    def rhs(self, t: float, state: NDArray, z: NDArray) -> NDArray:
        """Right-hand side ``d[y, a]/dt`` for :func:`scipy.integrate.solve_ivp`.

        ``state`` is the concatenation ``[y, a]`` of length 2n.
        """
        dy, da = drift(state[: self.n], state[self.n :], z, self)
        return np.concatenate([dy, da])

    def dn_fixed_point(self, z: ArrayLike) -> tuple[NDArray, NDArray]:
        """Closed-form fixed point for ``W_r = I``: divisive normalization (:func:`dn_fixed_point`).

        Raises
        ------
        ValueError
            If ``W_r`` is not the identity (use :func:`organics.solver.iterate_fixed_point`).
        """
        if not self.identity_recurrence:
            raise ValueError(
                "dn_fixed_point needs W_r = I; for a general W_r use "
                "organics.solver.iterate_fixed_point or fixed_point_by_simulation"
            )
        return dn_fixed_point(self.check_input(z), self.b, self.b0, self.sigma, self.W, self.rectified)


def drift(y: Any, a: Any, z: Any, p: Circuit | CircuitTensors) -> tuple[Any, Any]:
    """Time derivatives ``(dy/dt, da/dt)`` of the circuit.

    Implements::

        dy/dt = (-y + b z + (1 - sqrt(a+)) W_r r(y)) / tau_y
        da/dt = (-a + (sigma b0)^2 + W (a+ r(y)^2)) / tau_a

    with ``r(y) = y`` (main model) or ``r(y) = y+`` (rectified model).

    Parameters
    ----------
    y, a, z : ndarray or torch.Tensor, shape (..., n)
        States and input drive; leading dimensions are batch dimensions.
    p : Circuit or CircuitTensors
        Parameters, NumPy for NumPy inputs and tensors for tensor inputs.
    """
    a_pos = relu(a)
    r = relu(y) if p.rectified else y
    dy = (-y + p.b * z + (1 - _sqrt(a_pos)) * (r @ p.W_r.T)) / p.tau_y
    da = (-a + (p.sigma * p.b0) ** 2 + (a_pos * r**2) @ p.W.T) / p.tau_a
    return dy, da


def absolute_residual(y: Any, a: Any, z: Any, p: Circuit | CircuitTensors) -> Any:
    """Absolute residual: max-norm over neurons of the drift ``(dy/dt, da/dt)`` at ``(y, a)``.

    Zero exactly at a fixed point. For states of shape (..., n) returns shape (...): a float
    for one NumPy state, a tensor for a batch of tensors.
    """
    dy, da = drift(y, a, z, p)
    if isinstance(dy, torch.Tensor):
        return torch.maximum(dy.abs().amax(-1), da.abs().amax(-1))
    res = np.maximum(np.abs(dy).max(-1), np.abs(da).max(-1))
    return float(res) if np.ndim(res) == 0 else res


def relative_residual(y: Any, a: Any, z: Any, p: Circuit | CircuitTensors) -> Any:
    """Relative residual: the drift at ``(y, a)``, each equation divided by the size of its terms.

    For neuron ``i``, with ``r(y) = y`` (main model) or ``y+`` (rectified model)::

        rho_y,i = |tau_y dy/dt|_i / max(|y_i|, |b_i z_i|, |1 - sqrt(a_i+)| (|W_r| |r(y)|)_i)
        rho_a,i = |tau_a da/dt|_i / max(|a_i|, (sigma_i b0_i)^2, (W (a+ r(y)^2))_i)

    and the result is ``max_i max(rho_y,i, rho_a,i)``. The recurrent term is measured by the
    sum of the magnitudes of its products, ``|W_r| |r(y)|`` (elementwise absolute values),
    which bounds its rounding error, so the relative residual of a floating-point fixed point
    is a few ``eps`` at any scale of ``a``; a term of size 0 with a zero residual counts 0.
    Dimensionless, zero exactly at a fixed point.

    Parameters
    ----------
    y, a, z : ndarray or torch.Tensor, shape (..., n)
        States and input drive; leading dimensions are batch dimensions.
    p : Circuit or CircuitTensors

    Returns
    -------
    float for one NumPy state; an array (NumPy) or tensor (torch) of shape (...) for a batch.
    """
    dy, da = drift(y, a, z, p)
    a_pos = relu(a)
    r = relu(y) if p.rectified else y
    if isinstance(dy, torch.Tensor):
        absolute, maximum = torch.abs, torch.maximum

        def floor(x: torch.Tensor) -> torch.Tensor:  # the dtype's own smallest normal (float64's is 0 in float32)
            return torch.clamp(x, min=torch.finfo(x.dtype).tiny)
    else:
        absolute, maximum = np.abs, np.maximum

        def floor(x: NDArray) -> NDArray:
            return np.maximum(x, _TINY)

    recurrent = absolute(1 - _sqrt(a_pos)) * (absolute(r) @ absolute(p.W_r).T)
    scale_y = maximum(maximum(absolute(y), absolute(p.b * z)), recurrent)
    scale_a = maximum(maximum(absolute(a), (p.sigma * p.b0) ** 2 + 0 * a), (a_pos * r**2) @ p.W.T)
    rho_y = absolute(dy * p.tau_y) / floor(scale_y)
    rho_a = absolute(da * p.tau_a) / floor(scale_a)
    if isinstance(dy, torch.Tensor):
        return torch.maximum(rho_y.amax(-1), rho_a.amax(-1))
    rel = np.maximum(rho_y.max(-1), rho_a.max(-1))
    return float(rel) if np.ndim(rel) == 0 else rel


def dn_fixed_point(z: Any, b: Any, b0: Any, sigma: Any, W: Any, rectified: bool = False) -> tuple[Any, Any]:
    """Fixed point of the circuit with ``W_r = I`` in closed form: divisive normalization.

    Main model::

        a_s = (sigma b0)^2 + W (b z)^2,     y_s = b z / sqrt(a_s)
        =>  y_s^2 = (b z)^2 / ((sigma b0)^2 + W (b z)^2)

    Rectified model: neurons with ``b z < 0`` sit at ``y_s = b z`` and do not drive the
    modulators, ``a_s = (sigma b0)^2 + W ((b z)+)^2``.

    Works on NumPy arrays and on batched torch tensors (shape ``(..., n)``).
    """
    drive = b * z
    active = relu(drive) if rectified else drive
    a_s = (sigma * b0) ** 2 + (active**2) @ W.T
    y_s = active / _sqrt(a_s)
    if rectified:
        y_s = y_s + (drive - active)
    return y_s, a_s
