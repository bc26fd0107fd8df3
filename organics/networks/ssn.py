"""Stabilised supralinear networks (SSN): the baseline of the paper's Table 1 rows "SSN (50:50)" and "SSN (80:20)".

The paper quotes its SSN accuracies (94.9% at E:I 50:50, 95.2% at 80:20) from earlier work:
W. W. M. Soo and M. Lengyel, "Training stochastic stabilized supralinear networks by
dynamics-neutral growth", NeurIPS 35 (2022), https://openreview.net/forum?id=znbTxnBPlx. Their
MNIST model (read for facts only: TensorFlow, stochastic, grown from 1 E + 1 I neuron) has 50
excitatory and 50 inhibitory neurons fed by an autoencoder's code, ``W = |w| * mask`` for Dale's
law, rates ``0.3 [u]_+^2`` and a readout from the excitatory units. This module retrains such a
network deterministically, on the same autoencoder front end and protocol as the paper-era
ORGaNICs rows (:class:`organics.networks.static.Autoencoder`, spec section 3.2).

**The circuit.** ``N = N_E + N_I`` rate units, the first ``N_E`` excitatory. With input drive
``h = W_in x + c`` (from the 40-dim code ``x``) the rates obey

    T dr/dt = -r + k [W r + h]_+^n,      n = 2,      T = diag(tau_E, ..., tau_I, ...),

(Ahmadian, Rubin & Miller 2013), and the layer's output is the steady state ``r*``, reached by
simulating the dynamics.

- Dale's law: ``W_ij = s_j |V_ij| / N_j`` with ``s_j = +1`` and ``N_j = N_E`` for an excitatory
  presynaptic unit j, ``s_j = -1`` and ``N_j = N_I`` for an inhibitory one, so every presynaptic
  column has a fixed sign (E columns >= 0, I columns <= 0) for any learned ``V``, as with Soo &
  Lengyel's ``|w| * mask``. Dividing by ``N_j`` keeps ``V`` of order 1, so that Adam's steps
  (about ``lr`` per entry) are small relative to the weights. ``|V|`` starts at ``U(0, 2 J)``
  with the mean total weights ``J`` (postsynaptic, presynaptic) ``J_EE = 1``, ``J_EI = 1.5``,
  ``J_IE = 1.5``, ``J_II = 1`` (:data:`MEAN_WEIGHTS`): ``J_EI J_IE > J_EE J_II``, so that in
  the mean field inhibition can balance strong inputs (Ahmadian et al. 2013). It is only a
  stable start: training moves the weights, and nothing keeps them stable.
- ``k = 0.3`` (Soo & Lengyel's coefficient) is fixed, not learned: ``(k, W, h)`` and
  ``(c k, W / c, h)`` give the same network up to a rescaling of the rates by ``c``, which the
  readout absorbs, so a learned ``k`` would be a redundant degree of freedom.
- Time constants ``tau_E = 20`` ms, ``tau_I = 10`` ms. They do not change a steady state, only
  whether and how fast the simulation reaches it.
- The readout sees the excitatory rates ``r*_E`` only (cortical projection neurons are
  excitatory; Soo & Lengyel decode from their E units too).

**Steady state.** Explicit Euler, ``r <- r + (dt / tau) (-r + k [W r + h]_+^2)`` from ``r = 0``
(:func:`simulate`), until the residual ``F(r) = -r + k [W r + h]_+^2`` of every sample satisfies
``||F(r)||_inf <= tol ||r||_inf``, or ``max_steps`` steps have passed. A sample whose rates
become non-finite or exceed ``max_rate`` has *diverged* (the supralinear blow-up an SSN is
prone to without enough inhibition); its simulation stops at its last state within the bound.

**Gradient** (:func:`steady_state`): the implicit function theorem at the steady state. With
``u = W r* + h`` and ``D = diag(2 k [u]_+)``, the steady state ``r* = k [W r* + h]_+^2`` gives
``(I - D W) dr* = D (dW r* + dh) + [u]_+^2 dk``; for a loss with ``g = dL/dr*``, solve
``(I - W^T D) lambda = g``, then ``dL/dh = D lambda``, ``dL/dW = sum_batch (D lambda) r*^T``,
``dL/dk = lambda . [u]_+^2``. One batched linear solve per backward pass, no stored trajectory.

**Failures are counted, never silent.** A sample that did not converge within ``max_steps``, or
diverged, passes on its last simulated state (finite and bounded by ``max_rate``) and is counted
in ``SSNLayer.failures``; no gradient flows into the SSN's parameters or input through it
(the implicit gradient exists only at a steady state), so a failed sample cannot put NaNs into
the batch's gradient, while the readout and the loss still see it. :class:`SSNClassifier`
parameter counts (``N_E + N_I = 100`` units at both ratios, the neuron count of the ORGaNICs
(50:50) row: 50 principal plus 50 modulator neurons): SSN part 14,610 (50:50) and 14,910
(80:20) against 9,560 for the ORGaNICs layer and readout; with the shared 662,264-parameter
autoencoder, 676,874 and 677,174 against 671,824 (within 1%).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .._checks import check_choice, check_count, check_positive
from .static import FRONT_END, Autoencoder

__all__ = [
    "FAILURE_COUNTERS",
    "MEAN_WEIGHTS",
    "SSNClassifier",
    "SSNLayer",
    "SteadyState",
    "presynaptic_scale",
    "simulate",
    "ssn_drift",
    "steady_state",
]

FAILURE_COUNTERS = ("forward_passes", "samples", "not_converged", "diverged", "steps")
"""Keys of ``SSNLayer.failures``: passes, samples, failed samples of each kind, Euler steps (longest per pass)."""

MEAN_WEIGHTS = ((1.0, 1.5), (1.5, 1.0))
"""``((J_EE, J_EI), (J_IE, J_II))``: mean total weight a unit (row) receives from each population at initialisation."""


class SteadyState(NamedTuple):
    """A batch's simulated steady state: rates ``r`` (B, N), per-sample ``converged`` and ``diverged`` (B,) and
    ``steps`` (B,), the Euler steps each sample was simulated for."""

    r: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    steps: torch.Tensor


def presynaptic_scale(excitatory: int, inhibitory: int) -> torch.Tensor:
    """``s_j / N_j``: ``1 / N_E`` for each of the ``excitatory`` presynaptic columns, then ``-1 / N_I``."""
    return torch.cat([torch.full((excitatory,), 1.0 / excitatory), torch.full((inhibitory,), -1.0 / inhibitory)])


def ssn_drift(r: torch.Tensor, h: torch.Tensor, W: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """``F(r) = -r + k [W r + h]_+^2``, the drift ``T dr/dt`` of the SSN, for a batch of rates (B, N)."""
    return k * torch.relu(r @ W.T + h) ** 2 - r


def simulate(
    h: torch.Tensor,
    W: torch.Tensor,
    k: torch.Tensor | float,
    tau: torch.Tensor,
    *,
    dt: float,
    tol: float,
    max_steps: int,
    max_rate: float,
) -> SteadyState:
    """Explicit Euler simulation of ``T dr/dt = -r + k [W r + h]_+^2`` from ``r = 0``, without an autograd graph.

    Each sample stops when it has converged (``||F(r)||_inf <= tol ||r||_inf``) or diverged (a
    step would make a rate non-finite or larger than ``max_rate``: it keeps its last state
    within the bound); the others go on, up to ``max_steps`` Euler steps of size ``dt``.

    Parameters
    ----------
    h : torch.Tensor, shape (B, N)
        Input drives.
    W : torch.Tensor, shape (N, N)
        Recurrent weights (row: postsynaptic, column: presynaptic).
    k : float or torch.Tensor
        Gain of the power law.
    tau : torch.Tensor, shape (N,)
        Time constants, in the units of ``dt``.
    dt, tol, max_steps, max_rate
        Step size, relative residual to reach, step budget and divergence bound.

    Returns
    -------
    SteadyState
        Samples neither converged nor diverged ran out of steps.
    """
    with torch.no_grad():
        r = torch.zeros_like(h)
        step_size = dt / tau
        batch = h.shape[0]
        converged = torch.zeros(batch, dtype=torch.bool, device=h.device)
        diverged = torch.zeros_like(converged)
        steps = torch.zeros(batch, dtype=torch.long, device=h.device)
        for step in range(max_steps + 1):
            drift = ssn_drift(r, h, W, k)
            converged |= ~diverged & (drift.abs().amax(-1) <= tol * r.abs().amax(-1))
            active = ~(converged | diverged)
            if step == max_steps or not bool(active.any()):
                break
            r_next = r + step_size * drift
            blown = active & ~(torch.isfinite(r_next).all(-1) & (r_next.abs().amax(-1) <= max_rate))
            diverged |= blown
            active &= ~blown
            r = torch.where(active[:, None], r_next, r)
            steps += active
    return SteadyState(r, converged, diverged, steps)


class _ImplicitSteadyState(torch.autograd.Function):
    """The simulated steady state as a function of ``(h, W, k)``, differentiated by the implicit function theorem."""

    @staticmethod
    def forward(ctx, h, W, k, tau, options):  # noqa: ANN001, ANN205
        state = simulate(h, W, k, tau, **options)
        ctx.save_for_backward(state.r, h, W, k, state.converged)
        ctx.mark_non_differentiable(state.converged, state.diverged, state.steps)
        return tuple(state)

    @staticmethod
    def backward(ctx, g, *_):  # noqa: ANN001, ANN205
        r, h, W, k, converged = ctx.saved_tensors
        drive = torch.relu(r @ W.T + h)
        d = 2 * k * drive  # phi'(u) of phi(u) = k [u]_+^2
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        M = torch.where(converged[:, None, None], eye - W.T * d[:, None, :], eye)  # I - W^T D; I for failed samples
        lam = torch.linalg.solve(M, torch.where(converged[:, None], g, 0.0)[..., None])[..., 0]
        mu = d * lam
        grads = (mu, mu.T @ r, (lam * drive**2).sum().reshape(k.shape))
        return *(grad if need else None for grad, need in zip(grads, ctx.needs_input_grad[:3], strict=True)), None, None


def steady_state(
    h: torch.Tensor,
    W: torch.Tensor,
    k: torch.Tensor,
    tau: torch.Tensor,
    *,
    dt: float = 1.0,
    tol: float | None = None,
    max_steps: int = 2000,
    max_rate: float = 1e3,
) -> SteadyState:
    """:func:`simulate`, differentiable in ``h``, ``W`` and ``k`` at converged samples (implicit function theorem).

    ``tol`` defaults to 1e-4 in float32 and 1e-10 in float64. Samples that did not converge pass
    on their last state with a zero gradient (module docstring).
    """
    _check_options(dt, tol, max_steps, max_rate)
    if h.ndim != 2 or h.shape[0] < 1:
        raise ValueError(f"h must have shape (batch >= 1, N), got {tuple(h.shape)}")
    if tol is None:
        tol = 1e-4 if h.dtype == torch.float32 else 1e-10
    options = dict(dt=dt, tol=tol, max_steps=max_steps, max_rate=max_rate)
    return SteadyState(*_ImplicitSteadyState.apply(h, W, k, tau, options))


def _check_options(dt: float, tol: float | None, max_steps: int, max_rate: float) -> None:
    """Raise ``ValueError`` naming the first of the simulation's settings that is out of range."""
    check_positive("dt", dt)
    check_positive("max_rate", max_rate)
    check_count("max_steps", max_steps)
    check_positive("tol", tol, optional=True)


class SSNLayer(nn.Module):
    """An SSN whose output is its steady state ``r* = k [W r* + h]_+^2``, ``h = W_in x + c`` (module docstring).

    Parameters
    ----------
    input_size : int
        Dimension of ``x``.
    excitatory, inhibitory : int
        ``N_E`` and ``N_I``.
    k : float
        Gain of the power law (fixed).
    tau_e, tau_i : float
        Time constants (ms) of the E and I units.
    dt : float
        Euler step (ms).
    tol : float, optional
        Relative residual of a converged sample (dtype default of :func:`steady_state`).
    max_steps : int
        Euler steps allowed per forward pass.
    max_rate : float
        Rate above which a sample counts as diverged.

    Attributes
    ----------
    failures : dict
        Running counters (:data:`FAILURE_COUNTERS`): forward passes, samples, samples that did
        not converge within ``max_steps``, samples that diverged, and Euler steps; reset by
        :meth:`pop_failures`.
    """

    def __init__(
        self,
        input_size: int,
        excitatory: int = 50,
        inhibitory: int = 50,
        *,
        k: float = 0.3,
        tau_e: float = 20.0,
        tau_i: float = 10.0,
        dt: float = 1.0,
        tol: float | None = None,
        max_steps: int = 2000,
        max_rate: float = 1e3,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("excitatory", excitatory), ("inhibitory", inhibitory)):
            check_count(name, value)
        for name, value in (("k", k), ("tau_e", tau_e), ("tau_i", tau_i)):
            check_positive(name, value)
        _check_options(dt, tol, max_steps, max_rate)
        self.excitatory, self.inhibitory = excitatory, inhibitory
        self.options = dict(dt=dt, tol=tol, max_steps=max_steps, max_rate=max_rate)
        self.W_in = nn.Linear(input_size, excitatory + inhibitory)
        sizes = torch.tensor([excitatory, inhibitory])
        J = torch.tensor(MEAN_WEIGHTS).repeat_interleave(sizes, 0).repeat_interleave(sizes, 1)
        self.V = nn.Parameter(2 * J * torch.rand_like(J))
        self.register_buffer("scale", presynaptic_scale(excitatory, inhibitory))
        self.register_buffer("k", torch.tensor(float(k)))
        self.register_buffer("tau", torch.cat([torch.full((excitatory,), tau_e), torch.full((inhibitory,), tau_i)]))
        self.failures = dict.fromkeys(FAILURE_COUNTERS, 0)

    @property
    def W(self) -> torch.Tensor:
        """Recurrent weights ``W_ij = s_j |V_ij| / N_j`` (Dale's law: E columns >= 0, I columns <= 0)."""
        return self.V.abs() * self.scale

    def steady_state(self, x: torch.Tensor) -> SteadyState:
        """The steady state of every sample of ``x`` (B, input_size), all N rates; updates ``failures``."""
        state = steady_state(self.W_in(x), self.W, self.k, self.tau, **self.options)
        for key, value in (
            ("forward_passes", 1),
            ("samples", len(x)),
            ("not_converged", int((~state.converged & ~state.diverged).sum())),
            ("diverged", int(state.diverged.sum())),
            ("steps", int(state.steps.max())),
        ):
            self.failures[key] += value
        return state

    def pop_failures(self) -> dict[str, int]:
        """The counters of ``failures`` since the last call, then reset to zero."""
        counts, self.failures = self.failures, dict.fromkeys(FAILURE_COUNTERS, 0)
        return counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The excitatory steady-state rates ``r*_E`` (B, N_E)."""
        return self.steady_state(x).r[:, : self.excitatory]


class SSNClassifier(nn.Module):
    """An :class:`SSNLayer` and a linear readout of its excitatory rates, ``logits = W_o r*_E + c_o``.

    Parameters
    ----------
    input_size : int
        784 for MNIST.
    num_classes : int
        Number of logits.
    excitatory, inhibitory : int
        ``N_E`` and ``N_I`` (50:50 and 80:20 for the paper's rows).
    front_end : {"none", "autoencoder"}
        Feed the SSN the images (the default, as for
        :class:`~organics.networks.static.StaticORGaNICs`), or the 40-dim code of
        :class:`~organics.networks.static.Autoencoder` (whose reconstruction error is then
        :attr:`auxiliary_loss`; the Table 1 experiments).
    **layer_kwargs
        Passed to :class:`SSNLayer` (``k``, ``tau_e``, ``tau_i``, ``dt``, ``tol``, ``max_steps``, ``max_rate``).
    """

    def __init__(
        self,
        input_size: int = 784,
        num_classes: int = 10,
        *,
        excitatory: int = 50,
        inhibitory: int = 50,
        front_end: str = "none",
        **layer_kwargs: Any,
    ) -> None:
        super().__init__()
        check_choice("front_end", front_end, ("none", "autoencoder"))
        if front_end == "autoencoder" and input_size != FRONT_END[0]:
            raise ValueError(f"input_size must be {FRONT_END[0]} with the autoencoder front end, got {input_size}")
        self.front_end = Autoencoder() if front_end == "autoencoder" else None
        code_size = FRONT_END[-1] if self.front_end else input_size
        self.ssn = SSNLayer(code_size, excitatory, inhibitory, **layer_kwargs)
        self.readout = nn.Linear(excitatory, num_classes)

    @property
    def auxiliary_loss(self) -> torch.Tensor | None:
        """The front end's reconstruction loss of the last batch (added to the classification loss), if any."""
        return None if self.front_end is None else self.front_end.reconstruction_loss

    def pop_diagnostics(self) -> dict[str, int]:
        """The SSN's failure counters since the last call (then reset): what the trainer logs per epoch."""
        return self.ssn.pop_failures()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for flat images ``x`` (B, input_size)."""
        return self.readout(self.ssn(x if self.front_end is None else self.front_end(x)))
