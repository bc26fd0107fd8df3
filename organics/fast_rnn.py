"""A fast ORGaNICs RNN: the whole sequence's forward pass and a hand-written backward pass.

Computes exactly what :class:`organics.rnn.ORGaNICsRNN` computes with ``impl="reference"``
(the step loop over :class:`organics.rnn.ORGaNICsCell` with plain autograd), with the same
gradients, but organised for speed:

1. **Inputs once.** The input enters only through ``z = relu(W_zx x)`` and the gain drives
   ``W_bx x + c_b``, ``W_b0x x + c_b0``: these are computed for all time steps at once, before
   the loop, and their gradients flow back through ordinary autograd.
2. **Hand-written backpropagation through time.** One :class:`torch.autograd.Function` runs the
   whole recurrence: the forward pass writes every state into one preallocated buffer, the
   backward pass walks the steps backwards with the derivatives of the Euler update written
   out (no autograd graph of ~20 nodes per step, no per-step allocations).
3. **Weight gradients with one matrix product each.** The backward loop stores the gradients
   of the recurrent drives; after it, ``dL/dW`` for every recurrent matrix is a single product
   over all ``T x batch`` rows instead of ``T`` small ones.
4. **On a GPU** (engine ``"graph"``): the four recurrent products of a step are one cuBLAS call
   (a block matrix ``M``), all elementwise work of a step is one Triton kernel
   (:mod:`organics._rnn_kernels`), and the loops of ``T`` steps are captured once into CUDA
   graphs and replayed, which removes the launch overhead of ~3,000 kernels per sequence.

Engines: ``"torch"`` (torch operations, any device: the CPU path), ``"fused"`` (Triton kernels
without graphs; on the CPU only under ``TRITON_INTERPRET=1``, which the tests use), ``"graph"``
(fused and captured, CUDA only), ``"auto"`` (``"graph"`` for float32 on CUDA with Triton,
``"torch"`` otherwise).

State layout of the torch engine: ``S[t] = [y, a, b, b0]`` (batch, 4n) after ``t`` inputs, so one
Euler update of all four variables is ``S[t+1] = S[t] + dt * F[t]`` with the drifts
``F = [f_y, f_a, f_b, f_b0]``::

    f_y  = -y + b z + (1 - sqrt(a+)) P,          P  = W_r r(y)
    f_a  = -a + (sigma b0)^2 + Q_W,              Q_W = W (a+ r(y)^2)
    f_b  = sigmoid(u_b + [y, a] W_g[:, :n]) - b
    f_b0 = sigmoid(u_b0 + [y, a] W_g[:, n:]) - b0

with ``W_g = [[W_by^T, W_b0y^T], [W_ba^T, W_b0a^T]]`` (2n, 2n).
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .model import relu
from .rnn import ORGaNICsCell, RNNTrajectory

__all__ = [
    "ENGINES",
    "ScanInputs",
    "default_engine",
    "organics_scan",
    "scan_inputs",
    "supports",
]

ENGINES = ("auto", "torch", "fused", "graph")


def supports(x: torch.Tensor) -> bool:
    """Whether the fast path handles input ``x`` (float32 or float64, any device)."""
    return x.dtype in (torch.float32, torch.float64)


def _triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def default_engine(x: torch.Tensor) -> str:
    """The engine ``"auto"`` picks: ``"graph"`` for float32 CUDA input when Triton is there, else ``"torch"``."""
    if x.is_cuda and x.dtype == torch.float32 and _triton_usable(x.device):
        return "graph"
    return "torch"


class ScanInputs(NamedTuple):
    """Everything the recurrence needs, computed from the cell's parameters with autograd.

    ``z`` (T, B, n) input drives; ``u`` (T, B, 2n) input parts of the gain drives; ``s0``
    (B, 4n) initial ``[y, a, b, b0]``; ``W_g`` (2n, 2n) stacked gain weights; ``W_r``, ``W``
    (n, n); ``sigma`` (n,); ``dt`` (4n,) step sizes of y, a, b, b0.
    """

    z: torch.Tensor
    u: torch.Tensor
    s0: torch.Tensor
    W_g: torch.Tensor
    W_r: torch.Tensor
    W: torch.Tensor
    sigma: torch.Tensor
    dt: torch.Tensor


def scan_inputs(cell: ORGaNICsCell, x: torch.Tensor) -> ScanInputs:
    """The inputs of the recurrence for a batch-first sequence ``x`` (B, T, input_size)."""
    x_t = x.transpose(0, 1)
    z = relu(x_t @ cell.W_zx.T)
    u = x_t @ torch.cat([cell.W_bx, cell.W_b0x]).T + torch.cat([cell.c_b, cell.c_b0])
    s0 = torch.cat(cell.initial_state(x.shape[0]), dim=1)
    W_g = torch.cat([torch.cat([cell.W_by.T, cell.W_b0y.T], 1), torch.cat([cell.W_ba.T, cell.W_b0a.T], 1)], 0)
    return ScanInputs(z, u, s0, W_g, cell.W_r, cell.W, cell.sigma, torch.cat(cell.step_sizes()))


def organics_scan(
    cell: ORGaNICsCell, x: torch.Tensor, return_trajectory: bool = False, engine: str = "auto"
) -> tuple[torch.Tensor, RNNTrajectory | None]:
    """Run ``cell`` over the sequence ``x`` (B, T, input_size): final y (B, n) and optionally the trajectory.

    Same values and gradients as looping over ``cell``; ``engine`` as in the module docstring.
    The trajectory (y and a after each input, (B, T, n) each) is a copy and supports gradients.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not supports(x):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if engine == "auto":
        engine = default_engine(x)
    if engine in ("fused", "graph") and not _triton_usable(x.device):
        raise ValueError(f"engine={engine!r} needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if engine == "graph" and not x.is_cuda:
        raise ValueError("engine='graph' needs a CUDA device")
    inputs = scan_inputs(cell, x)
    y, Y, A = _Scan.apply(engine, cell.rectified, return_trajectory, *inputs)
    return y, (RNNTrajectory(Y.transpose(0, 1), A.transpose(0, 1)) if return_trajectory else None)


class _Scan(torch.autograd.Function):
    """The recurrence over all T steps as one autograd node (engine-specific forward and backward)."""

    @staticmethod
    def forward(ctx: Any, engine: str, rectified: bool, return_trajectory: bool, *inputs: torch.Tensor) -> Any:
        ctx.set_materialize_grads(False)
        p = ScanInputs(*(t.detach() for t in inputs))
        run = _TorchRun(p, rectified) if engine == "torch" else _fused_run(p, rectified, graphs=engine == "graph")
        ctx.run = run
        ctx.save_for_backward(*inputs)
        y, Y, A = run.outputs(return_trajectory)
        if not return_trajectory:
            ctx.mark_non_differentiable(Y, A)
        return y, Y, A

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Any, g_Y: Any, g_A: Any) -> Any:
        p = ScanInputs(*ctx.saved_tensors)
        grads = ctx.run.backward(p, g_y, g_Y, g_A)
        needed = ctx.needs_input_grad[3:]
        return (None, None, None, *(g if need else None for g, need in zip(grads, needed, strict=True)))


# ---------------------------------------------------------------------------------------------
# torch engine: any device, three matrix products and ~20 in-place elementwise operations a step


class _TorchRun:
    """Forward pass of the torch engine; keeps what the backward pass needs."""

    def __init__(self, p: ScanInputs, rectified: bool) -> None:
        T, B, n = p.z.shape
        new = p.z.new_empty
        self.rectified = rectified
        self.S = S = new(T + 1, B, 4 * n)  # [y, a, b, b0] after t inputs
        self.F = F = new(T, B, 4 * n)  # drifts [f_y, f_a, f_b, f_b0]
        self.SG = SG = new(T, B, 2 * n)  # sigmoid of the gain drives
        self.P = P = new(T, B, n)  # W_r r(y)
        self.QW = QW = new(T, B, n)  # W q
        self.Q = Q = new(T, B, n)  # q = a+ r(y)^2
        self.SQ = SQ = new(T, B, n)  # sqrt(a+)
        self.R = R = new(T, B, n) if rectified else S[:-1, :, :n]  # r(y)
        a_pos = new(B, n)
        sigma2 = p.sigma**2
        W_rT, W_T = p.W_r.T, p.W.T
        S[0] = p.s0
        for t in range(T):
            s, f = S[t], F[t]
            y, a, b, b0 = s[:, :n], s[:, n : 2 * n], s[:, 2 * n : 3 * n], s[:, 3 * n :]
            f_y, f_a = f[:, :n], f[:, n : 2 * n]
            torch.addmm(p.u[t], s[:, : 2 * n], p.W_g, out=SG[t]).sigmoid_()
            torch.sub(SG[t], s[:, 2 * n :], out=f[:, 2 * n :])
            r = torch.clamp(y, min=0, out=R[t]) if rectified else y
            torch.clamp(a, min=0, out=a_pos)
            torch.sqrt(a_pos, out=SQ[t])
            torch.mul(r, r, out=Q[t]).mul_(a_pos)
            torch.mm(r, W_rT, out=P[t])
            torch.mm(Q[t], W_T, out=QW[t])
            torch.addcmul(P[t], SQ[t], P[t], value=-1, out=f_y).addcmul_(b, p.z[t]).sub_(y)
            torch.mul(b0, b0, out=f_a).mul_(sigma2).add_(QW[t]).sub_(a)
            torch.addcmul(s, f, p.dt, out=S[t + 1])

    def outputs(self, trajectory: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.P.shape[-1]
        y = self.S[-1, :, :n].clone()
        if not trajectory:
            return y, y.new_empty(0), y.new_empty(0)
        return y, self.S[1:, :, :n].clone(), self.S[1:, :, n : 2 * n].clone()

    def backward(self, p: ScanInputs, g_y: Any, g_Y: Any, g_A: Any) -> tuple[torch.Tensor, ...]:
        S, F, SG, P, Q, SQ, R = self.S, self.F, self.SG, self.P, self.Q, self.SQ, self.R
        T, B, n = P.shape
        new = P.new_empty
        GS = P.new_zeros(T + 1, B, 4 * n)  # GS[t] = dL/dS[t]
        if g_Y is not None:
            GS[1:, :, :n] = g_Y
        if g_A is not None:
            GS[1:, :, n : 2 * n] = g_A
        if g_y is not None:
            GS[T, :, :n] += g_y
        E = new(T, B, 4 * n)  # dt * dL/dS[t+1] = [e_y, e_a, e_b, e_b0]
        GG = new(T, B, 2 * n)  # dL/d(gain pre-activations) = dL/du
        GP = new(T, B, n)  # dL/dP
        GZ = new(T, B, n)  # dL/dz
        acc_dt = P.new_zeros(B, 4 * n)
        acc_sigma = P.new_zeros(B, n)
        g_r, g_q, tmp, tmp2 = new(B, n), new(B, n), new(B, n), new(B, n)
        leak = 1 - p.dt
        two_sigma2 = 2 * p.sigma**2
        W_gT = p.W_g.T
        for t in reversed(range(T)):
            g, g_prev, s, e = GS[t + 1], GS[t], S[t], E[t]
            y, a, b, b0 = s[:, :n], s[:, n : 2 * n], s[:, 2 * n : 3 * n], s[:, 3 * n :]
            e_y, e_a = e[:, :n], e[:, n : 2 * n]
            acc_dt.addcmul_(g, F[t])
            torch.mul(g, p.dt, out=e)
            g_prev.addcmul_(g, leak)
            # gains: through the sigmoid, then back to [y, a] through W_g
            torch.addcmul(SG[t], SG[t], SG[t], value=-1, out=GG[t]).mul_(e[:, 2 * n :])
            g_prev[:, : 2 * n].addmm_(GG[t], W_gT)
            # input drive, input gain, normalization gain and sigma
            torch.mul(e_y, b, out=GZ[t])
            g_prev[:, 2 * n : 3 * n].addcmul_(e_y, p.z[t])
            torch.mul(e_a, b0, out=tmp)
            acc_sigma.addcmul_(tmp, b0)
            g_prev[:, 3 * n :].addcmul_(tmp, two_sigma2)
            # y: P = W_r r and the factor (1 - sqrt(a+)); a: Q_W = W q with q = a+ r^2
            torch.addcmul(e_y, e_y, SQ[t], value=-1, out=GP[t])
            torch.mm(GP[t], p.W_r, out=g_r)
            torch.mm(e_a, p.W, out=g_q)
            r = R[t]
            torch.mul(r, r, out=tmp).mul_(g_q)
            g_prev[:, n : 2 * n].add_(tmp.masked_fill_(a < 0, 0))
            torch.mul(e_y, P[t], out=tmp).div_(SQ[t]).masked_fill_(a <= 0, 0)
            g_prev[:, n : 2 * n].add_(tmp, alpha=-0.5)
            torch.clamp(a, min=0, out=tmp2).mul_(r).mul_(g_q)
            g_r.add_(tmp2, alpha=2)
            if self.rectified:
                g_r.masked_fill_(y < 0, 0)
            g_prev[:, :n].add_(g_r)
        rows = T * B
        g_W_g = S[:-1].reshape(rows, 4 * n)[:, : 2 * n].T @ GG.reshape(rows, 2 * n)
        g_W_r = GP.reshape(rows, n).T @ R.reshape(rows, n)
        g_W = E[:, :, n : 2 * n].reshape(rows, n).T @ Q.reshape(rows, n)
        g_sigma = 2 * p.sigma * acc_sigma.sum(0)
        return GZ, GG, GS[0], g_W_g, g_W_r, g_W, g_sigma, acc_dt.sum(0)


# ---------------------------------------------------------------------------------------------
# fused engine: one matrix product and one Triton kernel a step, optionally captured in CUDA graphs


def _block_matrix(M: torch.Tensor, p: ScanInputs) -> None:
    """Fill ``M`` (4n, 4n) so that ``[r, y, a, q] @ M = [W_r r, gain drives (2n), W q]``."""
    n = p.W_r.shape[0]
    M[:n, :n] = p.W_r.T
    M[n : 3 * n, n : 3 * n] = p.W_g
    M[3 * n :, 3 * n :] = p.W.T


@dataclass
class _FusedBuffers:
    """All tensors of a fused run; fixed addresses, so a CUDA graph can replay over them."""

    X: torch.Tensor  # (T+1, B, 6n): [r, y, a, q, b, b0]
    O: torch.Tensor  # (T, B, 4n): X[t, :, :4n] @ M
    Z: torch.Tensor  # (T, B, n)
    U: torch.Tensor  # (T, B, 2n)
    M: torch.Tensor  # (4n, 4n)
    dt: torch.Tensor  # (4n,)
    sigma: torch.Tensor  # (n,)
    GO: torch.Tensor  # (T, B, 4n): dL/dO
    GZ: torch.Tensor  # (T, B, n)
    D: torch.Tensor  # (2, B, 4n): direct part of dL/d[y, a, b, b0], alternating between steps
    GU: torch.Tensor  # (B, 4n): dL/d[r, y, a, q] through M
    g_y: torch.Tensor  # (B, n): dL/dy_T
    g_traj_y: torch.Tensor  # (T, B, n): dL/dy_t (trajectory output)
    g_traj_a: torch.Tensor  # (T, B, n): dL/da_t (trajectory output)
    acc_dt: torch.Tensor  # (B, 4n)
    acc_sigma: torch.Tensor  # (B, n)

    @classmethod
    def empty(cls, T: int, B: int, n: int, like: torch.Tensor) -> _FusedBuffers:
        new = like.new_empty
        return cls(
            X=new(T + 1, B, 6 * n),
            O=new(T, B, 4 * n),
            Z=new(T, B, n),
            U=new(T, B, 2 * n),
            M=like.new_zeros(4 * n, 4 * n),
            dt=new(4 * n),
            sigma=new(n),
            GO=new(T, B, 4 * n),
            GZ=new(T, B, n),
            D=new(2, B, 4 * n),
            GU=new(B, 4 * n),
            g_y=new(B, n),
            g_traj_y=new(T, B, n),
            g_traj_a=new(T, B, n),
            acc_dt=new(B, 4 * n),
            acc_sigma=new(B, n),
        )


class _FusedRunner:
    """Forward and backward loops of the fused engine over one set of buffers (one shape)."""

    def __init__(self, T: int, B: int, n: int, rectified: bool, like: torch.Tensor, graphs: bool) -> None:
        from . import _rnn_kernels

        self.k = _rnn_kernels
        self.T, self.B, self.n, self.rectified = T, B, n, rectified
        self.buf = _FusedBuffers.empty(T, B, n, like)
        self.grid = (_cdiv(B * n, _rnn_kernels.BLOCK),)
        self.graphs = graphs
        self._graph_fwd: Any = None
        self._graph_bwd: dict[tuple[bool, bool], Any] = {}
        self.busy = False

    def load(self, p: ScanInputs) -> None:
        """Copy this call's inputs into the buffers, and the initial state (with its r and q) into X[0]."""
        b, n = self.buf, self.n
        b.Z.copy_(p.z)
        b.U.copy_(p.u)
        _block_matrix(b.M, p)
        b.dt.copy_(p.dt)
        b.sigma.copy_(p.sigma)
        y0, a0 = p.s0[:, :n], p.s0[:, n : 2 * n]
        r0 = relu(y0) if self.rectified else y0
        x0 = b.X[0]
        x0[:, :n] = r0
        x0[:, n : 3 * n] = p.s0[:, : 2 * n]
        x0[:, 3 * n : 4 * n] = relu(a0) * r0**2
        x0[:, 4 * n :] = p.s0[:, 2 * n :]

    def _forward_loop(self) -> None:
        b, n, k = self.buf, self.n, self.k
        for t in range(self.T):
            torch.mm(b.X[t, :, : 4 * n], b.M, out=b.O[t])
            k.forward_step[self.grid](
                b.X[t],
                b.X[t + 1],
                b.O[t],
                b.Z[t],
                b.U[t],
                b.dt,
                b.sigma,
                self.B * n,
                N=n,
                RECTIFIED=self.rectified,
                BLOCK=k.BLOCK,
            )

    def _backward_loop(self, grad_Y: bool, grad_A: bool) -> None:
        b, n, k, T = self.buf, self.n, self.k, self.T
        b.acc_dt.zero_()
        b.acc_sigma.zero_()
        d_last = b.D[T % 2]
        d_last.zero_()
        d_last[:, :n] = b.g_y
        for t in reversed(range(T)):
            k.backward_step[self.grid](
                b.X[t],
                b.X[t + 1],
                b.O[t],
                b.Z[t],
                b.U[t],
                b.D[(t + 1) % 2],
                b.GU,
                b.g_traj_y[t],
                b.g_traj_a[t],
                b.D[t % 2],
                b.GO[t],
                b.GZ[t],
                b.acc_dt,
                b.acc_sigma,
                b.dt,
                b.sigma,
                self.B * n,
                N=n,
                RECTIFIED=self.rectified,
                HAS_GU=t < T - 1,
                GRAD_Y=grad_Y,
                GRAD_A=grad_A,
                BLOCK=k.BLOCK,
            )
            torch.mm(b.GO[t], b.M.T, out=b.GU)

    def forward(self) -> None:
        if not self.graphs:
            self._forward_loop()
            return
        if self._graph_fwd is None:
            self._graph_fwd = _capture(self._forward_loop)
        self._graph_fwd.replay()

    def backward(self, grad_Y: bool, grad_A: bool) -> None:
        if not self.graphs:
            self._backward_loop(grad_Y, grad_A)
            return
        key = (grad_Y, grad_A)
        if key not in self._graph_bwd:
            self._graph_bwd[key] = _capture(lambda: self._backward_loop(grad_Y, grad_A))
        self._graph_bwd[key].replay()


def _cdiv(a: int, b: int) -> int:
    """Ceiling division ``-(-a // b)``."""
    return -(-a // b)


def _capture(loop: Any) -> torch.cuda.CUDAGraph:
    """Run ``loop`` once on a side stream (compiling the kernels), then capture it into a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop()
    return graph


_RUNNERS: dict[tuple, list[_FusedRunner]] = {}


def _lease_runner(T: int, B: int, n: int, rectified: bool, like: torch.Tensor, graphs: bool) -> _FusedRunner:
    """A runner for this shape that no pending backward pass still needs (a new one if all are busy)."""
    key = (T, B, n, rectified, like.dtype, like.device, graphs)
    pool = _RUNNERS.setdefault(key, [])
    runner = next((r for r in pool if not r.busy), None)
    if runner is None:
        runner = _FusedRunner(T, B, n, rectified, like, graphs)
        pool.append(runner)
    runner.busy = True
    return runner


def _release(runner: _FusedRunner) -> None:
    runner.busy = False


class _FusedRun:
    """A forward pass of the fused engine; holds its runner until this object is garbage."""

    def __init__(self, runner: _FusedRunner, p: ScanInputs) -> None:
        self.runner = runner
        runner.load(p)
        runner.forward()
        weakref.finalize(self, _release, runner)

    def outputs(self, trajectory: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        X, n = self.runner.buf.X, self.runner.n
        y = X[-1, :, n : 2 * n].clone()
        if not trajectory:
            return y, y.new_empty(0), y.new_empty(0)
        return y, X[1:, :, n : 2 * n].clone(), X[1:, :, 2 * n : 3 * n].clone()

    def backward(self, p: ScanInputs, g_y: Any, g_Y: Any, g_A: Any) -> tuple[torch.Tensor, ...]:
        r = self.runner
        b, n, T, B = r.buf, r.n, r.T, r.B
        if g_y is None:
            b.g_y.zero_()
        else:
            b.g_y.copy_(g_y)
        if g_Y is not None:
            b.g_traj_y.copy_(g_Y)
        if g_A is not None:
            b.g_traj_a.copy_(g_A)
        r.backward(g_Y is not None, g_A is not None)
        rows = T * B
        X = b.X[:-1].reshape(rows, 6 * n)
        GO = b.GO.reshape(rows, 4 * n)
        g_W_r = GO[:, :n].T @ X[:, :n]
        g_W_g = X[:, n : 3 * n].T @ GO[:, n : 3 * n]
        g_W = GO[:, 3 * n :].T @ X[:, 3 * n : 4 * n]
        # dL/d(initial state): the direct part plus what reaches [r, y, a, q] at t = 0 through M
        x0, d0, gu = b.X[0], b.D[0], b.GU
        r0, y0, a0 = x0[:, :n], x0[:, n : 2 * n], x0[:, 2 * n : 3 * n]
        g_r = gu[:, :n] + 2 * gu[:, 3 * n :] * relu(a0) * r0
        if r.rectified:
            g_r = torch.where(y0 >= 0, g_r, 0)
        g_s0 = d0.clone()
        g_s0[:, :n] += gu[:, n : 2 * n] + g_r
        g_s0[:, n : 2 * n] += gu[:, 2 * n : 3 * n] + torch.where(a0 >= 0, gu[:, 3 * n :] * r0**2, 0)
        g_sigma = 2 * p.sigma * b.acc_sigma.sum(0)
        return b.GZ.clone(), b.GO[:, :, n : 3 * n].clone(), g_s0, g_W_g, g_W_r, g_W, g_sigma, b.acc_dt.sum(0)


def _fused_run(p: ScanInputs, rectified: bool, graphs: bool) -> _FusedRun:
    T, B, n = p.z.shape
    return _FusedRun(_lease_runner(T, B, n, rectified, p.z, graphs), p)
