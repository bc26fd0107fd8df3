"""The two-dimensional circuit (one y, one a): all fixed points, their stability, phase portraits.

With scalars ``w_r``, ``w``, ``b``, ``b0``, ``sigma``, ``z`` and ``c = (sigma b0)^2``::

    tau_y dy/dt = -y + b z + (1 - sqrt(a+)) w_r r(y)
    tau_a da/dt = -a + c + w a+ r(y)^2

(``r(y) = y`` main model, ``r(y) = y+`` rectified model). At a fixed point ``a > 0`` (``a <= 0``
would give ``a = c > 0``). Write ``s = sqrt(a) > 0``.

Main model, ``z != 0``: the y-equation gives ``y = b z / d(s)`` with ``d(s) = w_r s + 1 - w_r``
(``d = 0`` would force ``b z = 0``) and the a-equation, ``s^2 (1 - w y^2) = c``, becomes the quartic

    g(s) = s^2 (d(s)^2 - w (b z)^2) - c d(s)^2 = 0,

so the fixed points are ``(b z / d(s), s^2)`` for the real roots ``s > 0`` of ``g``.
Main model, ``z = 0``: ``(0, c)``, and if ``s* = (w_r - 1) / w_r`` satisfies ``s*^2 > c`` and ``w > 0``,
also ``(+-sqrt((1 - c / s*^2) / w), s*^2)``.
Rectified model: the fixed points of the main model with ``y > 0``, plus ``(b z, c)`` when ``b z <= 0``
(there ``r(y) = 0``).

For ``w_r > 0``, ``w > 0`` and ``z != 0`` a fixed point with ``d(s) > 0`` (so ``y`` of the sign of ``z``)
always exists: ``g = -c w (b z)^2 < 0`` at ``s = sqrt(c)``, ``g = -s^2 w (b z)^2 < 0`` where ``d(s) = 0``,
``g -> +inf`` as ``s -> inf``, and ``d`` is increasing, so ``g`` has a root beyond both points, where ``d > 0``.

Lemma (trace and determinant, :func:`trace_determinant`). Where ``r(y) = y`` near the point (main model,
or rectified model with ``y > 0``), the Jacobian at a fixed point has, using ``1 - w y^2 = c / s^2``,

    tr J  = -d(s) / tau_y - c / (s^2 tau_a)
    det J = (d(s) c / s^2 + w_r w s y^2) / (tau_y tau_a),

so for ``w_r >= 0`` and ``w >= 0`` every fixed point with ``d(s) > 0`` is stable (``tr J < 0 < det J``).

Non-smooth points. The rectified model is not differentiable on the line ``y = 0``; a fixed point lies
there only for ``z = 0`` (it is ``(0, c)``). That line is then invariant, so the point is stable if and only
if it is stable from both sides: :func:`fixed_points` flags it ``nonsmooth`` and classifies it by the worse
of its two one-sided Jacobians, ``diag(-1/tau_y, -1/tau_a)`` (``y < 0``) and
``diag(-d(sqrt(c))/tau_y, -1/tau_a)`` (``y > 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import numpy as np
from numpy.polynomial import Polynomial

from .circuit import Circuit, drift, relative_residual
from .stability import StabilityReport, analyze, jacobian

__all__ = [
    "PlanarFixedPoint",
    "planar_circuit",
    "fixed_point_polynomial",
    "fixed_points",
    "trace_determinant",
    "vector_field",
    "plot_phase_portrait",
]


@dataclass(frozen=True)
class PlanarFixedPoint:
    """A fixed point ``(y, a)`` of the 2D circuit, its relative residual and its linear stability.

    Attributes
    ----------
    y, a : float
        The state.
    relative_residual : float
        Drift at the point, each equation relative to its largest term.
    stability : StabilityReport
        Eigenvalues of the Jacobian and their classification. At a non-smooth point, the report of
        the worse side (larger spectral abscissa), so its label is ``"stable"`` only if both sides are.
    nonsmooth : bool
        True for a fixed point on the kink ``y = 0`` of the rectified model (``r(y) = y+``), where the
        Jacobian has two one-sided values.
    one_sided : tuple of StabilityReport, optional
        At a non-smooth point, the reports of the ``y < 0`` side (``r' = 0``) and of the ``y > 0`` side
        (``r' = 1``); None elsewhere.
    """

    y: float
    a: float
    relative_residual: float
    stability: StabilityReport
    nonsmooth: bool = False
    one_sided: tuple[StabilityReport, StabilityReport] | None = None

    @property
    def stable(self) -> bool:
        """Whether every eigenvalue has negative real part (beyond the tolerance), on both sides of a kink."""
        return self.stability.label == "stable"


def planar_circuit(
    w_r: float,
    *,
    w: float = 1.0,
    b: float = 0.5,
    b0: float = 0.5,
    sigma: float = 0.1,
    tau_y: float = 2.0,
    tau_a: float = 2.0,
    rectified: bool = False,
) -> Circuit:
    """The 2D circuit as a one-neuron :class:`~organics.circuit.Circuit` with ``W = [[w]]``, ``W_r = [[w_r]]``.

    Defaults are the common parameters of the paper's Fig. 1 (b = 0.5, tau = 2 ms, w = 1).
    """
    return Circuit(
        np.array([[w]], dtype=np.float64),
        b=b,
        b0=b0,
        sigma=sigma,
        tau_y=tau_y,
        tau_a=tau_a,
        W_r=np.array([[w_r]], dtype=np.float64),
        rectified=rectified,
    )


def _scalars(circuit: Circuit) -> tuple[float, float, float, float]:
    if circuit.n != 1:
        raise ValueError(f"circuit must be two-dimensional (n = 1), got n = {circuit.n}")
    c = float((circuit.sigma[0] * circuit.b0[0]) ** 2)
    return float(circuit.W_r[0, 0]), float(circuit.W[0, 0]), float(circuit.b[0]), c


def fixed_point_polynomial(circuit: Circuit, z: float) -> Polynomial:
    """The quartic ``g(s) = s^2 (d(s)^2 - w (b z)^2) - c d(s)^2``, ``d(s) = w_r s + 1 - w_r``, in ``s = sqrt(a)``.

    Its real roots ``s > 0`` give the fixed points ``(b z / d(s), s^2)`` of the main model
    (``z != 0``). Trailing zero coefficients are trimmed (``w_r = 0`` gives a quadratic).
    """
    w_r, w, b, c = _scalars(circuit)
    d = Polynomial([1 - w_r, w_r])
    s = Polynomial([0.0, 1.0])
    return (s**2 * (d**2 - w * (b * z) ** 2) - c * d**2).trim()


def _positive_real_roots(g: Polynomial, rtol: float = 1e-7) -> list[float]:
    if g.degree() < 1:
        return []
    roots: list[float] = []
    for root in g.roots():
        s = float(root.real)
        if abs(root.imag) <= rtol * max(1.0, abs(root)) and s > 0:
            if not any(abs(s - t) <= rtol * max(1.0, s) for t in roots):
                roots.append(s)
    return sorted(roots)


def _relative(circuit: Circuit, z: float, y: float, a: float) -> float:
    """:func:`organics.circuit.relative_residual` at one state of the 2D circuit."""
    return relative_residual(np.array([y]), np.array([a]), np.array([z]), circuit)


def _polish(circuit: Circuit, z: float, y: float, a: float, steps: int = 20) -> tuple[float, float]:
    """Newton steps ``x <- x - J^{-1} f(x)`` on the drift, kept while they reduce the residual."""
    res = _relative(circuit, z, y, a)
    for _ in range(steps):
        if res < 1e-14:
            break
        f = np.concatenate(drift(np.array([y]), np.array([a]), np.array([z]), circuit))
        try:
            dy, da = np.linalg.solve(jacobian(circuit, [y], [a]), f)
        except np.linalg.LinAlgError:
            break
        if not a - da > 0:
            break
        new_res = _relative(circuit, z, y - dy, a - da)
        if not new_res < res:
            break
        y, a, res = y - dy, a - da, new_res
    return float(y), float(a)


def _symmetric_pair(w_r: float, w: float, c: float) -> list[tuple[float, float]]:
    """The fixed points ``(+-sqrt((1 - c / s*^2) / w), s*^2)`` of ``b z = 0`` with ``d(s*) = 0``, where they exist."""
    if w_r == 0 or not w > 0:
        return []
    s_star = (w_r - 1) / w_r
    if not (s_star > 0 and s_star**2 > c):
        return []
    y_star = np.sqrt((1 - c / s_star**2) / w)
    return [(-y_star, s_star**2), (y_star, s_star**2)]


def _main_model_states(circuit: Circuit, z: float) -> list[tuple[float, float]]:
    w_r, w, b, c = _scalars(circuit)
    bz = b * z
    if bz == 0:
        return [(0.0, c), *_symmetric_pair(w_r, w, c)]
    # For small |b z| two fixed points sit near the pair of b z = 0, on either side of d(s) = 0, where the
    # quartic's roots nearly coincide (and may merge or be dropped below): the pair is a candidate too,
    # for Newton's method to carry to them.
    states = _symmetric_pair(w_r, w, c)
    for s in _positive_real_roots(fixed_point_polynomial(circuit, z)):
        d = w_r * s + 1 - w_r
        if abs(d) <= 1e-12 * max(1.0, abs(w_r) * s):
            continue
        candidates = [(bz / d, s**2)]
        if w > 0 and s**2 > c:  # y from the a-equation: well conditioned where d is nearly 0
            candidates.append((np.sign(bz * d) * np.sqrt((1 - c / s**2) / w), s**2))
        states.append(min(candidates, key=lambda state: _relative(circuit, z, *state)))
    return states


def fixed_points(circuit: Circuit, z: float, *, relative_residual_tol: float = 1e-9) -> list[PlanarFixedPoint]:
    """All fixed points of the 2D circuit, sorted by y, each classified by its Jacobian's eigenvalues.

    Candidates come from the real positive roots of :func:`fixed_point_polynomial` (or the
    closed forms for ``z = 0`` and for the rectified ``y <= 0`` branch) and, for any input, the
    symmetric pair of ``z = 0`` (near which two fixed points of a small input lie, where the quartic
    is ill-conditioned); they are polished by Newton steps on the drift, merged where they reach the
    same point, and kept only if the drift vanishes: each equation's residual, relative to its
    largest term, must be ``<= relative_residual_tol``. This discards spurious roots of
    an ill-conditioned quartic (e.g. ``w_r`` within ``1e-9`` of 1).

    A fixed point of the rectified model on its kink ``y = 0`` (only for ``z = 0``) is classified from
    both one-sided Jacobians, ``J_-`` (``r' = 0``, the ``y < 0`` side) and ``J_+`` (``r' = 1``): the line
    ``y = 0`` is then invariant, each closed half-plane carries smooth dynamics, and the point is stable
    only if both ``J_-`` and ``J_+`` are. Its ``stability`` is the worse of the two reports.

    Parameters
    ----------
    circuit : Circuit
        A one-neuron circuit (see :func:`planar_circuit`), main or rectified.
    z : float
        Input drive.
    relative_residual_tol : float
        Acceptance threshold for the relative drift residual.

    Returns
    -------
    list of PlanarFixedPoint
        ``relative_residual`` is the relative residual of the drift at the point.
    """
    _scalars(circuit)
    z = float(circuit.check_input(np.atleast_1d(z))[0])
    states = _main_model_states(circuit, z)
    if circuit.rectified:
        states = [(y, a) for y, a in states if y > 0]
        bz = float(circuit.b[0]) * z
        if bz <= 0:
            states.append((bz, float((circuit.sigma[0] * circuit.b0[0]) ** 2)))
    result: list[PlanarFixedPoint] = []
    for y, a in sorted(_polish(circuit, z, y, a) for y, a in states):
        res = _relative(circuit, z, y, a)
        if res > relative_residual_tol or any(_same_state((y, a), (p.y, p.a)) for p in result):
            continue
        if circuit.rectified and y == 0.0:  # the kink of r(y) = y+: classify from both sides
            sides = (analyze(circuit, [y], [a]), analyze(replace(circuit, rectified=False), [y], [a]))
            worse = max(sides, key=lambda report: report.abscissa)
            result.append(PlanarFixedPoint(y, a, res, worse, nonsmooth=True, one_sided=sides))
        else:
            result.append(PlanarFixedPoint(y, a, res, analyze(circuit, [y], [a])))
    return result


def _same_state(one: tuple[float, float], other: tuple[float, float], rtol: float = 1e-9) -> bool:
    """Whether two candidates polished to the same fixed point (equal to ``rtol``, relative to 1 or more)."""
    return all(abs(u - v) <= rtol * max(1.0, abs(u), abs(v)) for u, v in zip(one, other, strict=True))


def trace_determinant(circuit: Circuit, y: float, a: float) -> tuple[float, float, float]:
    """``d(s)``, ``tr J`` and ``det J`` in closed form at a fixed point ``(y, a)`` where ``r(y) = y``.

    With ``s = sqrt(a)``, ``d(s) = w_r s + 1 - w_r`` and ``c = (sigma b0)^2``, the Jacobian at a fixed
    point (where ``1 - w y^2 = c / s^2``) has::

        tr J  = -d(s) / tau_y - c / (s^2 tau_a)
        det J = (d(s) c / s^2 + w_r w s y^2) / (tau_y tau_a)

    so for ``w_r >= 0`` and ``w >= 0`` a fixed point with ``d(s) > 0`` has ``tr J < 0 < det J``: it is
    stable. The formulas use the fixed-point equations: away from a fixed point they are not ``J``'s.

    Parameters
    ----------
    circuit : Circuit
        A one-neuron circuit, main model, or rectified model at a point with ``y > 0``.
    y, a : float
        A fixed point (e.g. from :func:`fixed_points`), ``a > 0``.

    Returns
    -------
    tuple of float
        ``(d(s), tr J, det J)``.
    """
    w_r, w, _, c = _scalars(circuit)
    if not a > 0:
        raise ValueError(f"a must be > 0, got {a}")
    if circuit.rectified and not y > 0:
        raise ValueError(f"y must be > 0 for the rectified model (r(y) = y only there), got {y}")
    tau_y, tau_a = float(circuit.tau_y[0]), float(circuit.tau_a[0])
    s = float(np.sqrt(a))
    d = w_r * s + 1 - w_r
    return d, -d / tau_y - c / (s**2 * tau_a), (d * c / s**2 + w_r * w * s * y**2) / (tau_y * tau_a)


def vector_field(circuit: Circuit, z: float, y: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(dy/dt, da/dt)`` of the 2D circuit on arrays ``y``, ``a`` of one shape (e.g. a meshgrid)."""
    _scalars(circuit)
    y = np.asarray(y, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if y.shape != a.shape:
        raise ValueError(f"a must have the shape of y {y.shape}, got {a.shape}")
    dy, da = drift(y[..., None], a[..., None], np.array([float(z)]), circuit)
    return dy[..., 0], da[..., 0]


def plot_phase_portrait(
    circuit: Circuit,
    z: float,
    *,
    ax: plt.Axes | None = None,
    y_lim: tuple[float, float] | None = None,
    a_lim: tuple[float, float] | None = None,
    resolution: int = 200,
    title: str | None = None,
) -> plt.Axes:
    """Streamlines, nullclines (``dy/dt = 0`` blue, ``da/dt = 0`` orange) and fixed points.

    Stable fixed points are red stars, the others black circles (the paper's Fig. 1 and 3
    convention); a non-smooth fixed point (the rectified model's kink, see :func:`fixed_points`) is a
    diamond, red if stable from both sides, black otherwise. Limits default to a window around the
    fixed points.
    """
    points = fixed_points(circuit, z)
    if ax is None:
        ax = plt.gca()
    ys = np.array([p.y for p in points])
    as_ = np.array([p.a for p in points])
    if y_lim is None:
        half = max(0.5 * (ys.max() - ys.min()), 0.5 * max(1e-3, np.abs(ys).max()))
        y_lim = (ys.min() - half, ys.max() + half)
    if a_lim is None:
        a_lim = (0.0, 2.0 * as_.max())
    Y, A = np.meshgrid(np.linspace(*y_lim, resolution), np.linspace(*a_lim, resolution))
    dY, dA = vector_field(circuit, z, Y, A)
    ax.streamplot(Y, A, dY, dA, color="0.7", density=1.0, linewidth=0.7, arrowsize=0.8)
    ax.contour(Y, A, dY, levels=[0.0], colors="tab:blue", linewidths=1.5)
    ax.contour(Y, A, dA, levels=[0.0], colors="tab:orange", linewidths=1.5)
    for p in points:
        color = "red" if p.stable else "black"
        if p.nonsmooth:
            ax.plot(p.y, p.a, marker="D", color=color, markersize=8, zorder=5)
        elif p.stable:
            ax.plot(p.y, p.a, marker="*", color=color, markersize=14, zorder=5)
        else:
            ax.plot(p.y, p.a, marker="o", color=color, markersize=7, zorder=5)
    ax.set_xlim(*y_lim)
    ax.set_ylim(*a_lim)
    ax.set_xlabel("y")
    ax.set_ylabel("a")
    if title is not None:
        ax.set_title(title)
    return ax
