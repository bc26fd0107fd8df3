"""The linearised ``W_r = I`` circuit as coupled damped harmonic oscillators, and its energy.

Linearise the main model with ``W_r = I`` around its divisive-normalization fixed point
``(y_s, a_s)`` (``s = sqrt(a_s)``; ``S``, ``Y``, ``T_y``, ``T_a`` the diagonal matrices of ``s``,
``y_s``, ``tau_y``, ``tau_a``) with deviations ``u = y - y_s`` and ``v = a - a_s``::

    T_y u' = -S u - Y (2S)^{-1} v
    T_a v' = 2 W S^2 Y u + (-I + W Y^2) v

When every ``y_s`` is nonzero the first line gives ``v`` in terms of ``u`` and ``u'``; putting it
into the second (the terms in ``u`` collapse because ``a_s = s^2``) gives, exactly,

    M u'' + C u' + K u = 0,
    M = T_a T_y,   K = S,   C = T_a S + (I - Y S^{-1} W Y S) T_y

a system of damped harmonic oscillators, one per principal neuron, coupled only through the
damping matrix ``C``. Neuron i has natural frequency ``omega_i = sqrt(s_i / (tau_a,i tau_y,i))``
and damping ratio ``zeta_i = C_ii / (2 sqrt(M_ii K_ii))``.

Energy. For positive weights ``delta`` let::

    E = 1/2 sum_i delta_i (M_ii u_i'^2 + K_ii u_i^2)
    dE/dt = -1/2 u'^T (D C + C^T D) u'          (D = diag(delta), along the linear flow)

:func:`energy_weights` constructs ``delta`` with ``D C + C^T D`` positive definite, so ``E``
never increases and (LaSalle) the linearised circuit returns to the fixed point. Such weights
exist for every admissible circuit: ``C`` has positive diagonal and its comparison matrix
``T_a S + (I - |Y| S^{-1} W |Y| S) T_y`` is a nonsingular M-matrix, because ``|Y| S^{-1} W |Y| S``
is similar to ``W Y^2``, whose spectral radius is < 1 (see :func:`organics.stability.loop_gain`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.linalg import solve_continuous_lyapunov

from .circuit import Circuit

__all__ = [
    "OscillatorForm",
    "oscillator_form",
    "energy_weights",
    "quadratic_lyapunov",
]


@dataclass(frozen=True)
class OscillatorForm:
    """Second-order form ``M u'' + C u' + K u = 0`` of the linearised ``W_r = I`` circuit.

    Attributes
    ----------
    mass : ndarray, shape (n,)
        Diagonal of ``M = T_a T_y`` (ms^2).
    damping : ndarray, shape (n, n)
        ``C = T_a S + (I - Y S^{-1} W Y S) T_y`` (ms).
    stiffness : ndarray, shape (n,)
        Diagonal of ``K = S``, ``s = sqrt(a_s)``.
    y_s, a_s : ndarray, shape (n,)
        The fixed point.
    tau_y : ndarray, shape (n,)
        Time constants of y, needed to map ``(u, v)`` to the velocity ``u'``.
    """

    mass: NDArray
    damping: NDArray
    stiffness: NDArray
    y_s: NDArray
    a_s: NDArray
    tau_y: NDArray

    @property
    def natural_frequencies(self) -> NDArray:
        """``omega_i = sqrt(K_ii / M_ii) = sqrt(sqrt(a_s,i) / (tau_a,i tau_y,i))`` (rad/ms)."""
        return np.sqrt(self.stiffness / self.mass)

    @property
    def damping_ratios(self) -> NDArray:
        """``zeta_i = C_ii / (2 sqrt(M_ii K_ii))``: < 1 under-, = 1 critically, > 1 over-damped."""
        return np.diag(self.damping) / (2 * np.sqrt(self.mass * self.stiffness))

    def companion(self) -> NDArray:
        """First-order matrix ``[[0, I], [-M^{-1} K, -M^{-1} C]]`` of ``(u, u')``: same spectrum as the Jacobian."""
        n = self.mass.size
        top = np.concatenate([np.zeros((n, n)), np.eye(n)], axis=1)
        bottom = np.concatenate([-np.diag(self.stiffness / self.mass), -self.damping / self.mass[:, None]], axis=1)
        return np.concatenate([top, bottom], axis=0)

    def velocity(self, u: ArrayLike, v: ArrayLike) -> NDArray:
        """Linearised velocity ``u' = -(S u + Y (2S)^{-1} v) / T_y`` of deviations ``u, v`` (shape (..., n))."""
        s = np.sqrt(self.a_s)
        return -(s * np.asarray(u) + self.y_s / (2 * s) * np.asarray(v)) / self.tau_y

    def energy(self, u: ArrayLike, v: ArrayLike, delta: ArrayLike) -> NDArray:
        """``E = 1/2 sum_i delta_i (M_ii u_i'^2 + K_ii u_i^2)`` at deviations ``u = y - y_s``, ``v = a - a_s``.

        ``u'`` is the linearised velocity :meth:`velocity`, so ``E`` is a fixed quadratic form
        of the state, positive definite when every ``y_s`` is nonzero. Shape ``(...)``.
        """
        u = np.asarray(u, dtype=np.float64)
        du = self.velocity(u, v)
        return 0.5 * np.sum(np.asarray(delta) * (self.mass * du**2 + self.stiffness * u**2), axis=-1)

    def energy_rate(self, u: ArrayLike, v: ArrayLike, delta: ArrayLike) -> NDArray:
        """``dE/dt = -1/2 u'^T (D C + C^T D) u'`` along the linearised flow (shape ``(...)``)."""
        du = self.velocity(u, v)
        D = np.asarray(delta)[:, None]
        sym = D * self.damping + (D * self.damping).T
        return -0.5 * np.einsum("...i,ij,...j->...", du, sym, du)


def oscillator_form(circuit: Circuit, z: ArrayLike) -> OscillatorForm:
    """Second-order (damped oscillator) form of the main ``W_r = I`` circuit linearised at its fixed point.

    Raises
    ------
    ValueError
        If the circuit is rectified or has ``W_r != I`` (parameter ``circuit``), or if some
        ``z_i = 0`` (parameter ``z``): then ``y_s,i = 0`` and ``u_i`` decouples into a first-order mode.
    """
    if circuit.rectified or not circuit.identity_recurrence:
        raise ValueError("circuit must be the main model with W_r = I for the oscillator form")
    z = circuit.check_input(z)
    if z.ndim != 1 or np.any(z == 0):
        raise ValueError(f"z must have shape ({circuit.n},) with every entry nonzero")
    y, a = circuit.dn_fixed_point(z)
    s = np.sqrt(a)
    coupling = (y / s)[:, None] * circuit.W * (y * s)[None, :]
    damping = np.diag(circuit.tau_a * s) + (np.eye(circuit.n) - coupling) * circuit.tau_y[None, :]
    return OscillatorForm(circuit.tau_a * circuit.tau_y, damping, s, y, a, circuit.tau_y)


def energy_weights(form: OscillatorForm) -> NDArray:
    """Positive weights ``delta`` making ``D C + C^T D`` positive definite (``D = diag(delta)``).

    With ``A`` the comparison matrix of ``C`` (``A_ii = C_ii``, ``A_ij = -|C_ij|``), a nonsingular
    M-matrix, take ``x = A^{-1} 1 > 0`` and ``xi = A^{-T} 1 > 0`` and ``delta = xi / x``. Then
    ``(D A + A^T D) x = D 1 + A^T xi > 0`` makes the symmetric Z-matrix ``D A + A^T D`` positive
    definite, and ``D C + C^T D`` dominates it entrywise in the comparison sense.

    Raises
    ------
    ValueError
        If the comparison matrix is not a nonsingular M-matrix (parameter ``form``); this does
        not happen for forms built by :func:`oscillator_form`.
    """
    C = form.damping
    A = -np.abs(C)
    np.fill_diagonal(A, np.diag(C))
    ones = np.ones(C.shape[0])
    x = np.linalg.solve(A, ones)
    xi = np.linalg.solve(A.T, ones)
    if np.any(np.diag(C) <= 0) or np.any(x <= 0) or np.any(xi <= 0):
        raise ValueError("form: the comparison matrix of the damping is not a nonsingular M-matrix")
    return xi / x


def quadratic_lyapunov(J: ArrayLike, Q: ArrayLike | None = None) -> NDArray:
    """Solution ``P`` of the Lyapunov equation ``J^T P + P J = -Q`` (``Q = I`` by default).

    For a Hurwitz ``J`` the matrix ``P`` is symmetric positive definite and ``V(x) = x^T P x``
    satisfies ``dV/dt = -x^T Q x < 0`` along ``x' = J x``: a strict quadratic Lyapunov function,
    which also decreases near the fixed point along the nonlinear flow.
    """
    J = np.asarray(J, dtype=np.float64)
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"J must be a square matrix, got shape {J.shape}")
    Q = np.eye(J.shape[0]) if Q is None else np.asarray(Q, dtype=np.float64)
    P = solve_continuous_lyapunov(J.T, -Q)
    return 0.5 * (P + P.T)
