"""The elementwise work of each step of the ORGaNICs scan, compiled with numba: the ``"numba"`` engine's kernels.

The torch engine of :mod:`organics.networks.scan` spends about 17 (forward) and 30 (backward)
torch operations on every step, each on a (B, n) slice; at batch 256 and n = 64, torch's profiler
put their fixed costs and the Python around them at about a quarter of a training step on one
CPU core (2026-11-28), and replacing them saved 16% (n = 128) to 25% (n = 64) of the step
(``results/benchmarks/cpu_engines``). Here each direction's step is two compiled passes over
the batch around the recurrent products, which stay with torch (``torch.mm``, the CPU's BLAS:
numba's own ``numpy.dot`` took 5-9 times as long at these sizes):

- forward: :func:`forward_rates` (``r = r(y)``, ``q = a+ r^2``), then ``[y, a] W_g``, ``r W_r^T``
  and ``q W^T``, then :func:`forward_update` (the sigmoids and the Euler step);
- backward: :func:`forward_rates` again, :func:`backward_direct` (the gradients of the step's
  products and the direct path of the Euler step), then the products with ``W_g^T``, ``W_r``
  and ``W`` and the step's shares of the gradients of ``W_r`` and ``W``, then
  :func:`backward_recurrent` (the products' contributions to dL/dy and dL/da).

The state is kept as ``YA`` (``[y, a]``, width 2n) and ``BB`` (``[b, b0]``), so that the gains'
two products are one product with the (2n, 2n) ``W_g``, and its weight gradient one product
over all T x B rows after the loop. Arithmetic is in the arrays' dtype or wider; the step-size
and sigma gradients are summed over steps and rows in float64.
"""

from __future__ import annotations

import numpy as np

from ._fused import _compiled, njit

__all__ = ["backward_direct", "backward_recurrent", "forward_rates", "forward_update", "njit"]


@_compiled()
def forward_rates(YA: np.ndarray, R: np.ndarray, Q: np.ndarray, i: int, rectified: bool) -> None:
    """``R = r(y)`` and ``Q = q = a+ r(y)^2`` (B, n) of state ``YA[i] = [y, a]``; ``r(y) = y+`` if ``rectified``."""
    B, n = R.shape
    zero = R.dtype.type(0.0)
    for row in range(B):
        for j in range(n):
            y, a = YA[i, row, j], YA[i, row, n + j]
            r = max(y, zero) if rectified else y
            R[row, j] = r
            Q[row, j] = max(a, zero) * r * r


@_compiled()
def forward_update(
    z: np.ndarray, YA: np.ndarray, BB: np.ndarray, G: np.ndarray, P: np.ndarray, FA: np.ndarray,
    QW: np.ndarray, sigma: np.ndarray, dt: np.ndarray, t: int, i: int, i_next: int, k: int,
) -> None:  # fmt: skip
    """One Euler step from state ``i`` into state ``i_next``, given the step's products.

    ``G[k]`` holds the gains' sigmoids ``s = sigmoid(u_t + [y, a] W_g)`` (torch's, vectorised: numba
    calls the exponential once per entry, which took three times this whole pass),
    ``P[k] = W_r r(y)``, ``QW = W q``. Writes ``FA[k] = f_a`` and the next state::

        f_y = -y + b z_t + (1 - sqrt(a+)) W_r r(y)      f_a = -a + (sigma b0)^2 + W q
        y' = y + dt_y f_y     a' = a + dt_a f_a     b' = b + dt_b (s_b - b)     b0' = b0 + dt_b0 (s_b0 - b0)
    """
    B, n = P.shape[1], P.shape[2]
    zero = P.dtype.type(0.0)
    for row in range(B):
        for j in range(n):
            y, a = YA[i, row, j], YA[i, row, n + j]
            b, b0 = BB[i, row, j], BB[i, row, n + j]
            s_b, s_b0 = G[k, row, j], G[k, row, n + j]
            p = P[k, row, j]
            f_y = p - np.sqrt(max(a, zero)) * p + b * z[t, row, j] - y
            sb0 = sigma[j] * b0
            f_a = QW[row, j] - a + sb0 * sb0
            FA[k, row, j] = f_a
            YA[i_next, row, j] = y + dt[j] * f_y
            YA[i_next, row, n + j] = a + dt[n + j] * f_a
            BB[i_next, row, j] = b + dt[2 * n + j] * (s_b - b)
            BB[i_next, row, n + j] = b0 + dt[3 * n + j] * (s_b0 - b0)


@_compiled()
def backward_direct(
    z: np.ndarray, YA: np.ndarray, BB: np.ndarray, G: np.ndarray, P: np.ndarray, FA: np.ndarray,
    sigma: np.ndarray, dt: np.ndarray, g_Y: np.ndarray, g_A: np.ndarray, g_ya: np.ndarray, g_bb: np.ndarray,
    GG: np.ndarray, GZ: np.ndarray, GP: np.ndarray, EA: np.ndarray, acc_dt: np.ndarray, acc_sigma: np.ndarray,
    t: int,
) -> bool:  # fmt: skip
    """Backpropagate through step ``t`` up to its products; ``False`` (and nothing done) if some ``a <= 0`` there.

    On entry ``g_ya = [dL/dy, dL/da]`` and ``g_bb = [dL/db, dL/db0]`` after the step (``g_Y[t]``,
    ``g_A[t]`` are added first where given, shape (T, B, n); empty otherwise). Writes the
    gradients of the step's products, ``GG[t]`` (gain drives: ``s (1 - s) dt_b dL/db'``),
    ``GP`` (``W_r r``: ``(1 - sqrt(a)) e_y``) and ``EA`` (``W q``: ``e_a``), the last two (B, n)
    for this step only, with ``e = dt dL/d(next state)``, and ``GZ[t] = b e_y`` (``z_t``); adds the step's terms to
    ``acc_dt`` (``dL/d dt``, 4n) and ``acc_sigma`` (``sum e_a b0^2``); and leaves in ``g_ya``,
    ``g_bb`` the gradients with respect to the state before the step through every path but the
    products (:func:`backward_recurrent` adds those). ``a > 0`` at every step (see the scan's
    module docstring), so ``a+ = a`` and ``sqrt(a) > 0``.
    """
    B, n = P.shape[1], P.shape[2]
    half, two = P.dtype.type(0.5), P.dtype.type(2.0)
    positive = True  # no early exit: a loop without one is vectorised (10 us of 108 per step at B 256, n 64)
    for row in range(B):
        for j in range(n):
            positive &= YA[t, row, n + j] > 0.0
    if not positive:
        return False
    trajectory_y, trajectory_a = g_Y.shape[0] > 0, g_A.shape[0] > 0
    for row in range(B):
        for j in range(n):
            if trajectory_y:
                g_ya[row, j] += g_Y[t, row, j]
            if trajectory_a:
                g_ya[row, n + j] += g_A[t, row, j]
            g_y, g_a, g_b, g_b0 = g_ya[row, j], g_ya[row, n + j], g_bb[row, j], g_bb[row, n + j]
            y, a = YA[t, row, j], YA[t, row, n + j]
            b, b0 = BB[t, row, j], BB[t, row, n + j]
            s_b, s_b0 = G[t, row, j], G[t, row, n + j]
            p, z_t, sq = P[t, row, j], z[t, row, j], np.sqrt(a)
            acc_dt[j] += g_y * (p - sq * p + b * z_t - y)
            acc_dt[n + j] += g_a * FA[t, row, j]
            acc_dt[2 * n + j] += g_b * (s_b - b)
            acc_dt[3 * n + j] += g_b0 * (s_b0 - b0)
            e_y, e_a = g_y * dt[j], g_a * dt[n + j]
            e_b, e_b0 = g_b * dt[2 * n + j], g_b0 * dt[3 * n + j]
            GG[t, row, j] = (s_b - s_b * s_b) * e_b
            GG[t, row, n + j] = (s_b0 - s_b0 * s_b0) * e_b0
            GZ[t, row, j] = e_y * b
            GP[row, j] = e_y - e_y * sq
            EA[row, j] = e_a
            e_a_b0 = e_a * b0
            acc_sigma[j] += e_a_b0 * b0
            g_ya[row, j] = g_y - e_y
            g_ya[row, n + j] = g_a - e_a - half * e_y * p / sq
            g_bb[row, j] = g_b - e_b + e_y * z_t
            g_bb[row, n + j] = g_b0 - e_b0 + two * sigma[j] * sigma[j] * e_a_b0
    return True


@_compiled()
def backward_recurrent(
    YA: np.ndarray, R: np.ndarray, g_ya: np.ndarray, G_YA: np.ndarray, G_R: np.ndarray, G_Q: np.ndarray,
    t: int, rectified: bool,
) -> None:  # fmt: skip
    """Add the products' paths of step ``t`` to ``g_ya = [dL/dy, dL/da]`` (the state before the step).

    ``R = r(y)`` (B, n) of state ``t`` (:func:`forward_rates`); ``G_YA = GG[t] W_g^T`` (through the
    gains), ``G_R = GP W_r`` (dL/dr through ``W_r r``) and ``G_Q = EA W`` (dL/dq): with
    ``q = a r^2``, dL/dr gains ``2 a r G_Q`` and dL/da ``r^2 G_Q``; dL/dy is dL/dr where ``y >= 0``
    (``rectified``; else everywhere).
    """
    B, n = R.shape
    zero, two = R.dtype.type(0.0), R.dtype.type(2.0)
    for row in range(B):
        for j in range(n):
            r, a, g_q = R[row, j], YA[t, row, n + j], G_Q[row, j]
            g_r = G_R[row, j] + two * a * r * g_q
            if rectified and not YA[t, row, j] >= 0.0:
                g_r = zero
            g_ya[row, j] += g_r + G_YA[row, j]
            g_ya[row, n + j] += g_q * r * r + G_YA[row, n + j]
