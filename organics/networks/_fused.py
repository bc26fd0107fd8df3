"""The static layers' Anderson-accelerated iterations, each fused into one loop compiled with numba (CPU tensors).

:func:`organics.solver.anderson` driving :func:`organics.networks.static.sweep_update` (the
forward solve) or the sweep's adjoint step (the backward pass) costs about 40 torch operations
per iteration on (B, 2n) tensors, and at batch 256 and n = 50-120 each operation's fixed cost,
not its arithmetic, sets the time: a mixing step took about 0.6 ms where its arithmetic takes
0.05. Here the same iteration runs as one compiled loop: the step's two matrix products go to
BLAS (``numpy.dot``), everything else (the step's elementwise work, the residuals, the Gram
matrix of the kept residuals, each row's m x m solve and the mixture) is plain loops over the
batch. It is tested equal to the readable pair in ``tests/test_networks_static.py``.

The state is kept as (2, B, n) arrays, ``x[0] = y`` and ``x[1] = a`` (or the adjoint's two
halves), so that both halves enter their matrix products contiguous; a row's vector is
``(x[0, b], x[1, b])``. Arithmetic is in the tensors' dtype, as in the readable version, except
each row's m x m solve (float64).

One difference in what is computed: the rows go through in blocks of :data:`BLOCK_ROWS`, and a
block stops (or starts mixing) on its own rows' residuals, where the readable version iterates
the whole batch until its slowest row has converged. A row of either stops at an iterate whose
step moved it by less than the tolerance, so the two agree to the tolerance; where the batch
fits in one block they take the same steps, up to rounding.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from .._checks import check_count

try:
    from numba import njit
except Exception:  # noqa: BLE001  a dependency, but where it is missing or fails to load (a numpy it refuses, a
    njit = None  # bare GPU host) the package still works, with the readable engine

__all__ = ["SWEEP", "ADJOINT", "supports", "fused_anderson"]

SWEEP, ADJOINT = 0, 1
"""The two iterations :func:`fused_anderson` runs (its ``kind``)."""

_FAST = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; not nnan/ninf: the loop tests for NaN and inf


def _compiled(fastmath: set[str] | bool = False):  # noqa: ANN202
    """numba's ``njit`` (cached on disk; floating-point division by zero gives inf or NaN, as in numpy and torch,
    not Python's ZeroDivisionError), or the function as it is where numba cannot be imported."""
    return (lambda f: f) if njit is None else njit(cache=True, fastmath=fastmath, error_model="numpy")


def supports(t: torch.Tensor) -> bool:
    """Whether :func:`fused_anderson` can take tensors like ``t``: numba is there, and ``t`` is on the CPU, in
    float32 or float64."""
    return njit is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


@_compiled(_FAST)
def _step(kind: int, x: np.ndarray, f: np.ndarray, M: np.ndarray, N: np.ndarray, V: np.ndarray) -> None:
    """``f = T(x)`` for the sweep (``kind = SWEEP``) or the sweep's adjoint (``kind = ADJOINT``).

    Sweep, with ``M = W_r^T``, ``N = W^T``, ``V = (b z, (sigma b0)^2)``::

        f_y = b z + (1 - sqrt(a+)) (y W_r^T),      f_a = (sigma b0)^2 + (a f_y^2) W^T

    Adjoint, with ``M = W``, ``N = W_r``, ``V = (g_y, g_a, 2 a y, 1 - sqrt(a), y^2, (W_r y) / (2 sqrt(a)))``
    at the fixed point, ``m = l_a W`` and ``l = l_y + m 2 a y``::

        f_y = g_y + (l (1 - sqrt(a))) W_r,      f_a = g_a + m y^2 - l (W_r y) / (2 sqrt(a))
    """
    _, B, n = x.shape
    one, zero = np.ones(1, x.dtype)[0], np.zeros(1, x.dtype)[0]  # arithmetic in the tensors' dtype
    if kind == SWEEP:
        P = x[0] @ M
        q = np.empty_like(P)
        for b in range(B):
            a, bz, Pb, fy, qb = x[1, b], V[0, b], P[b], f[0, b], q[b]
            for i in range(n):
                y = bz[i] + (one - np.sqrt(a[i] if a[i] > zero else zero)) * Pb[i]
                fy[i] = y
                qb[i] = a[i] * y * y
        Q = q @ N
        for b in range(B):
            c, Qb, fa = V[1, b], Q[b], f[1, b]
            for i in range(n):
                fa[i] = c[i] + Qb[i]
    else:
        m = x[1] @ M
        l = np.empty_like(m)
        for b in range(B):
            l_y, mb, lb, fa = x[0, b], m[b], l[b], f[1, b]
            g_a, two_ay, gate, y2, h = V[1, b], V[2, b], V[3, b], V[4, b], V[5, b]
            for i in range(n):
                li = l_y[i] + mb[i] * two_ay[i]
                lb[i] = li * gate[i]
                fa[i] = g_a[i] + (mb[i] * y2[i] - li * h[i])
        L = l @ N
        for b in range(B):
            g_y, Lb, fy = V[0, b], L[b], f[0, b]
            for i in range(n):
                fy[i] = g_y[i] + Lb[i]


@_compiled(_FAST)
def _anderson(
    kind: int, x: np.ndarray, M: np.ndarray, N: np.ndarray, V: np.ndarray, scratch: tuple, sign: int, options: tuple
) -> tuple[int, bool]:
    """:func:`organics.solver.anderson` with ``step = _step(kind, ...)``, on ``x`` in place; a row has converged
    when its step moved it by ``r < atol`` or ``r <= rtol max(max |f|, 1e-30)`` (max over the row).

    ``options = (atol, rtol, depth, max_iter, regularization, slow)``; ``scratch = (F, G, work, bits)``:
    ``F`` and ``G`` (B, depth, 2n) keep each row's images ``f_i`` and residuals ``g_i``, ``(y, a)`` end to end;
    ``work`` (3, 2, B, n) holds ``f``, ``f - x`` and a scalar cell; ``bits`` is the same memory as integers of
    the same width and ``sign`` their sign bit: the largest magnitude of a row is taken over the integers
    ``bits & ~sign`` (ordered as the magnitudes are, NaN above inf), which the compiler vectorises where it
    does not a float maximum. All are scratch, reused from call to call (allocating them each time cost
    more than the iterations of a fast solve).
    """
    _, B, n = x.shape
    atol, rtol, depth, max_iter, regularization, slow = options
    F, G, work, bits = scratch
    f, D, cell = work[0], work[1], work[2, :, 0, 0]
    magnitude = ~sign
    zero, alpha = np.zeros(1, x.dtype)[0], np.empty(depth, x.dtype)
    H = np.zeros((depth, depth, B))  # G G^T with its diagonal scaled by 1 + lambda, row by row
    L, w, total = np.empty((depth, depth, B)), np.empty((depth, B)), np.empty(B)
    mixed, largest = 0, np.inf
    for k in range(1, max_iter + 1):
        _step(kind, x, f, M, N, V)
        done, residual = True, 0.0
        for b in range(B):
            largest_g, largest_f = sign & 0, sign & 0
            for s in range(2):
                for i in range(n):
                    D[s, b, i] = f[s, b, i] - x[s, b, i]
                for i in range(n):
                    g = bits[1, s, b, i] & magnitude
                    largest_g = g if g > largest_g else largest_g
                if rtol > 0:
                    for i in range(n):
                        g = bits[0, s, b, i] & magnitude
                        largest_f = g if g > largest_f else largest_f
            bits[2, 0, 0, 0], bits[2, 1, 0, 0] = largest_g, largest_f
            r, size = cell[0], cell[1]
            if not (r < atol or r <= rtol * max(size, 1e-30)):
                done = False
            if r > residual or r != r:
                residual = r if residual == residual else residual
        if done:
            return k, True
        if mixed == 0:
            if not math.isfinite(residual):
                return k, False
            if residual <= slow * largest:  # fast enough: a plain step
                x[:] = f
                largest = residual
                continue
        j, m = mixed % depth, min(mixed + 1, depth)
        mixed += 1
        norms = 0.0
        for b in range(B):
            Fj, Gj = F[b, j], G[b, j]
            for s in range(2):
                for i in range(n):
                    Fj[s * n + i] = f[s, b, i]
                    Gj[s * n + i] = D[s, b, i]
            for p in range(m):
                Gp, h = G[b, p], zero  # in the tensors' dtype, as the readable version
                for i in range(2 * n):
                    h += Gp[i] * Gj[i]
                H[j, p, b] = h
                H[p, j, b] = h
            norms += H[j, j, b]
            H[j, j, b] *= 1 + regularization
        if not math.isfinite(norms):
            return k, False
        # alpha = w / sum(w) with H w = 1, by Cholesky H = L L^T, every row of the batch at once (the innermost
        # loops run over the batch); where H is not numerically positive definite, L and alpha get NaN
        for p in range(m):
            for q in range(p + 1):
                for b in range(B):
                    h = H[p, q, b]
                    for t in range(q):
                        h -= L[p, t, b] * L[q, t, b]
                    L[p, q, b] = h / L[q, q, b] if q < p else (math.sqrt(h) if h > 0 else np.nan)
        for p in range(m):  # L u = 1, then L^T w = u
            for b in range(B):
                h = 1.0
                for t in range(p):
                    h -= L[p, t, b] * w[t, b]
                w[p, b] = h / L[p, p, b]
        for b in range(B):
            total[b] = 0.0
        for p in range(m - 1, -1, -1):
            for b in range(B):
                h = w[p, b]
                for t in range(p + 1, m):
                    h -= L[t, p, b] * w[t, b]
                w[p, b] = h / L[p, p, b]
                total[b] += w[p, b]
        for b in range(B):
            ok = math.isfinite(1 / total[b])
            for p in range(m):
                alpha[p] = w[p, b] / total[b]
                ok = ok and math.isfinite(alpha[p])
            for s in range(2):
                xs = x[s, b]
                if ok:  # x = sum_p alpha_p f_p
                    Fp, ap = F[b, 0], alpha[0]
                    for i in range(n):
                        xs[i] = ap * Fp[s * n + i]
                    for p in range(1, m):
                        Fp, ap = F[b, p], alpha[p]
                        for i in range(n):
                            xs[i] += ap * Fp[s * n + i]
                else:  # the plain step
                    for i in range(n):
                        xs[i] = f[s, b, i]
    return max_iter, False


@_compiled()
def _by_blocks(
    kind: int,
    x: np.ndarray,
    M: np.ndarray,
    N: np.ndarray,
    V: np.ndarray,
    xb: np.ndarray,
    Vb: np.ndarray,
    scratch: tuple,
    sign: int,
    options: tuple,
) -> tuple[np.ndarray, int, bool]:
    """:func:`_anderson` on the rows of ``x`` block by block (``R`` rows each, the shape of ``xb``), the last
    block padded with copies of the last row: the iterations a block needs and whether it converged are its
    own, and the iterations reported are the largest, converged only if every block did."""
    _, B, n = x.shape
    R = xb.shape[1]
    out = np.empty_like(x)
    iterations, converged = 0, True
    for start in range(0, B, R):
        for r in range(R):
            xb[:, r] = x[:, min(start + r, B - 1)]
            Vb[:, r] = V[:, min(start + r, B - 1)]
        k, ok = _anderson(kind, xb, M, N, Vb, scratch, sign, options)
        for r in range(min(R, B - start)):
            out[:, start + r] = xb[:, r]
        iterations, converged = max(iterations, k), converged and ok
    return out, iterations, converged


BLOCK_ROWS = 16
"""Rows go through :func:`fused_anderson` in blocks of this many (:func:`_by_blocks`).

A block's kept images and residuals (150 KB at n = 120 in float32) stay in the processor's cache from one
iteration to the next, where a whole batch's (2.4 MB) came from memory at every one, and a block stops when
its own rows have converged. At the trained Table 1 layers (batch 256, n = 50-120) blocks of 8 to 32 rows
solved the forward problem 1.3 to 2 times faster than the whole batch at once; 4 rows were slower again."""

_SCRATCH = threading.local()


def _scratch(*shapes: tuple[int, ...], dtype: np.dtype) -> list[np.ndarray]:
    """Arrays of these shapes, the same ones for the same shapes and dtype (per thread): their memory is paged in
    once, not at every call."""
    key = (shapes, np.dtype(dtype))
    cache = _SCRATCH.__dict__.setdefault("arrays", {})
    if key not in cache:
        if len(cache) >= 8:  # a few layers' worth, a few MB each
            cache.clear()
        cache[key] = [np.empty(shape, dtype) for shape in shapes]
    return cache[key]


def fused_anderson(
    kind: int,
    x: torch.Tensor,
    M: torch.Tensor,
    N: torch.Tensor,
    V: torch.Tensor,
    *,
    atol: float = -1.0,
    rtol: float = -1.0,
    depth: int = 5,
    max_iter: int = 100,
    regularization: float = 1e-4,
    slow: float = 0.5,
) -> tuple[torch.Tensor, int, bool]:
    """:func:`organics.solver.anderson` of the sweep or its adjoint (``kind``), compiled.

    Parameters
    ----------
    kind : {SWEEP, ADJOINT}
        The iteration (``_step`` gives its equations and what ``M``, ``N``, ``V`` hold).
    x : torch.Tensor, shape (2, B, n)
        Starting point, its two halves stacked.
    M, N : torch.Tensor, shape (n, n)
    V : torch.Tensor, shape (2, B, n) or (6, B, n)
    atol, rtol : float
        A row has converged when a step moves no entry by ``atol`` or more, or by more than
        ``rtol`` times the step's largest entry (-1: that test is off).
    depth, max_iter, regularization, slow
        As in :func:`organics.solver.anderson`.

    Returns
    -------
    x : torch.Tensor, shape (2, B, n)
    iterations : int
    converged : bool
        As returned by :func:`organics.solver.anderson`.
    """
    check_count("depth", depth)
    check_count("max_iter", max_iter)
    arrays = [t.detach().contiguous().numpy() for t in (x, M, N, V)]
    (_, B, n), dtype = arrays[0].shape, arrays[0].dtype
    R = min(B, BLOCK_ROWS)
    integer = np.int32 if dtype == np.float32 else np.int64
    xb, Vb, F, G, work = _scratch(
        (2, R, n), (len(arrays[3]), R, n), (R, depth, 2 * n), (R, depth, 2 * n), (3, 2, R, n), dtype=dtype
    )
    sign = integer(np.iinfo(integer).min)
    options = (float(atol), float(rtol), int(depth), int(max_iter), float(regularization), float(slow))
    out, k, ok = _by_blocks(kind, *arrays, xb, Vb, (F, G, work, work.view(integer)), sign, options)
    return torch.from_numpy(out), int(k), bool(ok)
