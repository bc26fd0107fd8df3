"""The ORGaNICs scan: a whole sequence's forward pass and a hand-written backward pass.

Computes what looping over :class:`organics.networks.cell.ORGaNICsCell` with plain autograd
computes (``impl="loop"`` of :class:`organics.networks.rnn.ORGaNICsRNN`), with the same
gradients, organised for speed:

1. **Inputs once.** The input enters only through ``z = relu(W_zx x)`` and the gain drives'
   input parts ``u = [W_bx x + c_b, W_b0x x + c_b0]``: these are computed for all time steps at
   once, before the loop, and their gradients flow back through ordinary autograd.
2. **Hand-written backpropagation through time.** One :class:`torch.autograd.Function` runs the
   whole recurrence. The forward pass writes what the backward pass needs into preallocated
   buffers; the backward pass walks the steps backwards with the derivatives of the Euler
   update written out: no autograd graph of ~25 nodes per step, no per-step allocations.
3. **Weight gradients with one matrix product each.** The backward loop stores the gradients of
   the recurrent drives; after it, ``dL/dW`` of every recurrent matrix is a single product over
   all ``T x batch`` rows instead of ``T`` small ones.
4. **Contiguous buffers, few elementwise passes, no boolean masks.** Each state variable has its
   own contiguous buffer; on the CPU, elementwise operations on strided slices and masked
   operations cost several times a plain one.
5. **Nothing stored without gradients.** Under ``torch.no_grad()`` (evaluation) the loop keeps
   only the current state (and the trajectory if asked), like the step loop.

The backward pass uses ``a > 0``, which holds for every step: the initial state has
``a = (sigma b0)^2 > 0``, ``b0`` stays in ``(0, 1)`` and ``W (a+ r(y)^2) >= 0``, so
``a_{t+1} >= (1 - dt_a) a_t + dt_a (sigma b0)^2 > 0``. The backward pass checks it (it could
only fail by floating-point underflow) and raises :class:`FloatingPointError` otherwise.

Engines:

- ``"torch"``: torch operations, any device;
- ``"numba"``: the torch engine's products, and each step's elementwise work in two passes
  compiled with numba (:mod:`organics.networks._compiled_steps`); CPU tensors;
- ``"triton"``: per step, the four recurrent products are one matrix product with a block
  matrix and all elementwise work is one Triton kernel (:mod:`organics.networks._kernels`);
  two launches per step and direction;
- ``"persistent"``: one Triton launch per direction runs all T steps, the state of a tile of
  sequences in registers, the products with ``tl.dot`` (:mod:`organics.networks._persistent`);
  TF32 products when ``torch.backends.cuda.matmul.allow_tf32`` is on, else IEEE float32;
- ``"resident"``: the persistent kernels with the weights (``W_r``, ``W_g``, ``W``) loaded once and
  kept in shared memory in half precision (192 KiB at n = 128), float32 inputs only: each product
  scales every row of its left operand into half precision by its largest magnitude (the two
  products summed into a gate's drive by the larger of their two) and accumulates in float32,
  so its operands carry 11 significant bits like TF32's.

The Triton engines run on CUDA, and on the CPU only under the Triton interpreter
(``TRITON_INTERPRET=1``), which the tests use. ``"auto"`` picks ``"persistent"`` on CUDA
when Triton is installed (``"triton"`` above :data:`PERSISTENT_MAX_HIDDEN` neurons or on a GPU
with less shared memory per block than :data:`PERSISTENT_SHARED_MEMORY`), ``"numba"`` on the
CPU where numba is installed, and ``"torch"`` otherwise (:func:`default_engine`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .._checks import check_choice
from ..circuit import relu
from . import _compiled_steps
from .cell import ORGaNICsCell, check_sequence

__all__ = [
    "ENGINES",
    "RNNTrajectory",
    "ScanInputs",
    "PERSISTENT_MAX_HIDDEN",
    "PERSISTENT_SHARED_MEMORY",
    "default_engine",
    "organics_scan",
    "organics_scan_runs",
    "persistent_kernel_resources",
    "scan_inputs",
    "supports",
]

ENGINES = ("auto", "torch", "numba", "triton", "persistent", "resident")

_ONE_LAUNCH = ("persistent", "resident")  # the engines of the persistent kernels (_PersistentRun)

PERSISTENT_MAX_HIDDEN = 128
"""The largest hidden size for which ``"auto"`` picks the persistent engine (Table 2's largest)."""

PERSISTENT_SHARED_MEMORY = 98_304
"""Bytes of shared memory per block the persistent kernels need at n = 128 (the backward kernel, compiled for
sm_90; :func:`persistent_kernel_resources`): ``"auto"`` picks the engine on GPUs that offer this much."""


class RNNTrajectory(NamedTuple):
    """States after each input: ``y`` and ``a`` of shape (batch, T, hidden_size)."""

    y: torch.Tensor
    a: torch.Tensor


def supports(x: torch.Tensor) -> bool:
    """Whether the fast path handles input ``x`` (float32 or float64, any device)."""
    return x.dtype in (torch.float32, torch.float64)


def _triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _numba_usable(device: torch.device) -> bool:
    return _compiled_steps.njit is not None and device.type == "cpu"


def default_engine(x: torch.Tensor, hidden_size: int) -> str:
    """The engine ``"auto"`` picks for input ``x`` to a cell of ``hidden_size`` neurons.

    On CUDA with Triton installed: ``"persistent"`` up to :data:`PERSISTENT_MAX_HIDDEN` neurons
    on a GPU whose blocks may use :data:`PERSISTENT_SHARED_MEMORY` bytes of shared memory (what
    its kernels need there; on an H100 it passed the relay's check against the float64 loop at
    n = 64 and 128 and was the fastest engine, 2026-11-27), ``"triton"`` otherwise. On the CPU
    ``"numba"`` where numba is installed (a training step at batch 256, T = 784 took 0.469 s
    against the torch engine's 0.624 at n = 64, and 1.227 against 1.468 s at n = 128, on 2 cores
    under the trainer's settings, 2026-11-28: ``results/benchmarks/cpu_engines``). ``"torch"``
    everywhere else.
    """
    if _numba_usable(x.device):
        return "numba"
    if not (x.is_cuda and _triton_usable(x.device)):
        return "torch"
    shared = getattr(torch.cuda.get_device_properties(x.device), "shared_memory_per_block_optin", 0)
    fits = hidden_size <= PERSISTENT_MAX_HIDDEN and shared >= PERSISTENT_SHARED_MEMORY
    return "persistent" if fits else "triton"


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the step loop on one CPU thread: its operations are too small to gain from splitting.

    Splitting each small operation across threads costs a synchronisation per operation, which on
    a busy machine costs far more than the operation (measured: up to 20x slower with 2 threads).
    ``torch.set_num_threads`` is process-wide; the previous value is restored afterwards.
    """
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ScanInputs(NamedTuple):
    """Everything the recurrence needs, computed from the cell's parameters with autograd.

    ``z`` (T, B, n) input drives; ``u`` (T, B, 2n) input parts of the gain drives; ``y0, a0`` (B, n)
    and ``bb0`` (B, 2n) initial ``y``, ``a`` and ``[b, b0]``; ``W_g`` (2n, 2n) stacked gain weights
    (``[y, a] @ W_g`` are the recurrent parts of the gain drives); ``W_r``, ``W`` (n, n);
    ``sigma`` (n,); ``dt`` (4n,) step sizes of y, a, b, b0.
    """

    z: torch.Tensor
    u: torch.Tensor
    y0: torch.Tensor
    a0: torch.Tensor
    bb0: torch.Tensor
    W_g: torch.Tensor
    W_r: torch.Tensor
    W: torch.Tensor
    sigma: torch.Tensor
    dt: torch.Tensor


def scan_inputs(cell: ORGaNICsCell, x: torch.Tensor) -> ScanInputs:
    """The inputs of the recurrence for a batch-first sequence ``x`` (B, T, input_size)."""
    x_t = x.transpose(0, 1)
    z = cell.drive(x_t)
    u = x_t @ torch.cat([cell.W_bx, cell.W_b0x]).T + torch.cat([cell.c_b, cell.c_b0])
    y0, a0, b0_gain, b00 = cell.initial_state(x.shape[0])
    W_g = torch.cat([torch.cat([cell.W_by.T, cell.W_b0y.T], 1), torch.cat([cell.W_ba.T, cell.W_b0a.T], 1)], 0)
    bb0 = torch.cat([b0_gain, b00], 1)
    return ScanInputs(z, u, y0, a0, bb0, W_g, cell.W_r, cell.W, cell.sigma, torch.cat(cell.step_sizes()))


def organics_scan(
    cell: ORGaNICsCell, x: torch.Tensor, return_trajectory: bool = False, engine: str = "auto"
) -> tuple[torch.Tensor, RNNTrajectory | None]:
    """Run ``cell`` over the sequence ``x`` (B, T, input_size): final y (B, n) and optionally the trajectory.

    Same values and gradients as looping over ``cell``; ``engine`` as in the module docstring.
    The trajectory (y and a after each input, (B, T, n) each) supports gradients. Without
    gradients (``torch.no_grad()`` or no input requiring them) nothing is stored for a backward
    pass: the persistent, resident and numba engines run their own forward pass, the torch and
    triton engines the torch engine's forward loop.
    """
    check_choice("engine", engine, ENGINES)
    check_sequence(x, cell.input_size)
    if not supports(x):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if engine == "auto":
        engine = default_engine(x, cell.hidden_size)
    if engine in ("triton", *_ONE_LAUNCH) and not _triton_usable(x.device):
        raise ValueError(f"engine={engine!r} needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if engine == "numba" and not _numba_usable(x.device):
        raise ValueError(f"engine='numba' needs numba and a CPU tensor, got one on {x.device.type}")
    inputs = scan_inputs(cell, x)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        y, Y, A = _Scan.apply(engine, cell.rectified, return_trajectory, *inputs)
    elif engine in _ONE_LAUNCH:
        p = ScanInputs(*(t.detach() for t in inputs))
        run = _PersistentRun(p, cell.rectified, store=return_trajectory, trajectory=return_trajectory, engine=engine)
        y, Y, A = run.outputs()
    else:  # the triton engine has no storage-free pass: the torch engine's, on the same device
        run = _CPU_RUNS.get(engine, _TorchRun)
        y, Y, A = run(inputs, cell.rectified, store=False, trajectory=return_trajectory).outputs()
    return y, (RNNTrajectory(Y.transpose(0, 1), A.transpose(0, 1)) if return_trajectory else None)


def organics_scan_runs(
    cells: Sequence[ORGaNICsCell], xs: Sequence[torch.Tensor], engine: str = "auto"
) -> list[torch.Tensor]:
    """Several independent runs, ``cells[i]`` over ``xs[i]``: the final y of each, as :func:`organics_scan` computes it.

    With the persistent engine all runs go through the same two kernel launches (forward and
    backward; the grid's second axis is the run), which fills a GPU that one run of batch 256
    leaves mostly idle; the other engines run them one after the other. The cells must have the
    same hidden size and ``rectified`` flag, and the inputs the same shape, dtype and device.
    """
    if len(cells) != len(xs) or not cells:
        raise ValueError(f"cells and xs must be non-empty and of the same length, got {len(cells)} and {len(xs)}")
    for cell, x in zip(cells, xs, strict=True):
        check_sequence(x, cell.input_size)
    if engine == "auto":
        engine = default_engine(xs[0], cells[0].hidden_size)
    if engine not in _ONE_LAUNCH or len(cells) == 1:
        return [organics_scan(cell, x, engine=engine)[0] for cell, x in zip(cells, xs, strict=True)]
    shapes = {(c.hidden_size, c.rectified, x.shape, x.dtype, x.device) for c, x in zip(cells, xs, strict=True)}
    if len(shapes) > 1:
        raise ValueError(f"runs in one launch need one hidden size, rectified flag and input shape, got {shapes}")
    if not supports(xs[0]):
        raise ValueError(f"xs must be float32 or float64, got {xs[0].dtype}")
    if not _triton_usable(xs[0].device):
        raise ValueError(f"engine={engine!r} needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    runs = [scan_inputs(cell, x) for cell, x in zip(cells, xs, strict=True)]
    inputs = ScanInputs(*(torch.stack(field) for field in zip(*runs, strict=True)))
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        y, _, _ = _Scan.apply(engine, cells[0].rectified, False, *inputs)
    else:
        p = ScanInputs(*(t.detach() for t in inputs))
        y, _, _ = _PersistentRun(p, cells[0].rectified, store=False, trajectory=False, engine=engine).outputs()
    return list(y.unbind(0))


class _Scan(torch.autograd.Function):
    """The recurrence over all T steps as one autograd node (engine-specific forward and backward)."""

    @staticmethod
    def forward(ctx: Any, engine: str, rectified: bool, return_trajectory: bool, *inputs: torch.Tensor) -> Any:
        ctx.set_materialize_grads(False)
        p = ScanInputs(*(t.detach() for t in inputs))
        if engine in _CPU_RUNS:
            run = _CPU_RUNS[engine](p, rectified, store=True, trajectory=return_trajectory)
        elif engine == "triton":
            run = _TritonRun(p, rectified, trajectory=return_trajectory)
        else:
            run = _PersistentRun(p, rectified, store=True, trajectory=return_trajectory, engine=engine)
        ctx.run = run
        ctx.save_for_backward(*inputs)
        y, Y, A = run.outputs()
        if not return_trajectory:
            ctx.mark_non_differentiable(Y, A)
        return y, Y, A

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Any, g_Y: Any, g_A: Any) -> Any:
        if ctx.run is None:
            raise RuntimeError("the fast ORGaNICs scan supports one backward pass per forward pass (no retain_graph)")
        p = ScanInputs(*ctx.saved_tensors)
        grads = ctx.run.backward(p, g_y, g_Y, g_A)
        ctx.run = None  # frees the stored forward pass
        needed = ctx.needs_input_grad[3:]
        return (None, None, None, *(g if need else None for g, need in zip(grads, needed, strict=True)))


# ---------------------------------------------------------------------------------------------
# torch engine: any device; per step four matrix products and ~13 (forward) / ~23 (backward)
# elementwise operations on contiguous (B, n) or (B, 2n) slices of preallocated buffers


_SPARE: dict[tuple, tuple] = {}
"""The buffers of the last stored CPU pass (torch or numba engine) whose backward pass has run, for the next pass of
its engine and shape: at most one set.

A training step's stored pass of the torch engine fills 13 buffers of T x B x n or T x B x 2n
entries (0.8 GB at B = 256, T = 784, n = 64 in float32; the numba engine's, half as much).
Allocations that large come fresh from the operating system each time (the C library maps them
and unmaps them when freed), and the first write to each 4 KiB page costs a page fault: with new
buffers every step, 300,000 faults and about 0.5 s of system time per training step of the
torch engine (measured 2026-11-28 on this project's 2-core development machine, one thread).
Reused, they are written in place. Everything in them is written before it is read. The trainer
(``organics.train``) also has the C library keep freed memory while it trains, which covers the
buffers that autograd owns as well.
"""


def _spare_or_new(run: object, p: ScanInputs, store: bool, rectified: bool, allocate: Any) -> tuple[Any, tuple]:
    """The key under which a CPU run's stored buffers are kept (None: not kept) and its buffers: those of
    :data:`_SPARE` if they have the key, else ``allocate()``."""
    key = (type(run), p.z.shape, p.z.dtype, rectified) if store and p.z.device.type == "cpu" else None
    buffers = _SPARE.pop(key, None)
    return key, allocate() if buffers is None else buffers


def _keep_spare(key: Any, buffers: tuple) -> None:
    """Keep a run's buffers in :data:`_SPARE` for the next stored pass of its shape (the only set kept)."""
    if key is not None:
        _SPARE.clear()
        _SPARE[key] = buffers


class _TorchRun:
    """Forward pass of the torch engine; with ``store`` it keeps what the backward pass needs.

    Buffers hold one entry per step (``store``) or a single reused entry; the states ``Y, A``
    ``(y, a)`` and ``BB`` (``[b, b0]``) hold all ``T + 1`` states when stored or when the trajectory
    is asked for, else two alternating ones.
    """

    def __init__(self, p: ScanInputs, rectified: bool, store: bool, trajectory: bool) -> None:
        T, B, n = p.z.shape
        steps = T if store else 1
        states = T + 1 if store or trajectory else 2
        self.rectified, self.trajectory = rectified, trajectory
        new = p.z.new_empty
        self.key, buffers = _spare_or_new(self, p, store, rectified, lambda: (
            new(states, B, n), new(states, B, n), new(states, B, 2 * n),  # states
            new(steps, B, n), new(steps, B, n), new(steps, B, 2 * n),  # drifts
            new(steps, B, 2 * n), new(steps, B, n), new(steps, B, n), new(steps, B, n),
            new(steps, B, n) if rectified else None,
            *((new(T, B, n), new(T, B, n)) if store else (None, None)),
        ))  # fmt: skip
        self.buffers = buffers
        self.Y, self.A, self.BB, self.FY, self.FA, self.FBB = buffers[:6]
        self.G = buffers[6]  # sigmoid of the gain drives
        self.P = buffers[7]  # W_r r(y)
        self.SQ = buffers[8]  # sqrt(a+)
        self.Q = buffers[9]  # q = a+ r(y)^2
        self.R = buffers[10]  # r(y) = y+ (rectified model only)
        self.GP, self.EA = buffers[11:]  # the backward pass's dL/dP and dL/d(W q) (stored runs only)
        self.Y[0], self.A[0], self.BB[0] = p.y0, p.a0, p.bb0
        with _one_thread_on_cpu(p.z.device):
            self._loop(p, states, steps, rectified)

    def _loop(self, p: ScanInputs, states: int, steps: int, rectified: bool) -> None:
        T, B, n = p.z.shape
        qw, b0_sigma, a_pos = p.z.new_empty(B, n), p.z.new_empty(B, n), p.z.new_empty(B, n)
        W_gy, W_ga = p.W_g[:n], p.W_g[n:]
        W_rT, W_T = p.W_r.T, p.W.T
        dt_y, dt_a, dt_bb = p.dt[:n], p.dt[n : 2 * n], p.dt[2 * n :]
        for t in range(T):
            i, i_next, j = t % states, (t + 1) % states, t % steps
            y, a, bb = self.Y[i], self.A[i], self.BB[i]
            b, b0 = bb[:, :n], bb[:, n:]
            g = torch.addmm(p.u[t], y, W_gy, out=self.G[j]).addmm_(a, W_ga).sigmoid_()
            torch.sub(g, bb, out=self.FBB[j])
            r = torch.clamp(y, min=0, out=self.R[j]) if rectified else y
            torch.clamp(a, min=0, out=a_pos)
            torch.sqrt(a_pos, out=self.SQ[j])
            torch.mul(r, r, out=self.Q[j]).mul_(a_pos)
            torch.mm(r, W_rT, out=self.P[j])
            torch.mm(self.Q[j], W_T, out=qw)
            # f_y = -y + b z + (1 - sqrt(a+)) P,  f_a = -a + (sigma b0)^2 + W q
            torch.addcmul(self.P[j], self.SQ[j], self.P[j], value=-1, out=self.FY[j]).addcmul_(b, p.z[t]).sub_(y)
            torch.mul(b0, p.sigma, out=b0_sigma)
            torch.sub(qw, a, out=self.FA[j]).addcmul_(b0_sigma, b0_sigma)
            torch.addcmul(y, self.FY[j], dt_y, out=self.Y[i_next])
            torch.addcmul(a, self.FA[j], dt_a, out=self.A[i_next])
            torch.addcmul(bb, self.FBB[j], dt_bb, out=self.BB[i_next])
        self.last = T % states

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final y (B, n) and, if the trajectory was asked for, y and a after each input (T, B, n)."""
        y = self.Y[self.last].clone()
        if not self.trajectory:
            return y, y.new_empty(0), y.new_empty(0)
        return y, self.Y[1:].clone(), self.A[1:].clone()

    def backward(self, p: ScanInputs, g_y: Any, g_Y: Any, g_A: Any) -> tuple[torch.Tensor, ...]:
        """Gradients of the loss with respect to every field of :class:`ScanInputs`."""
        T, B, n = self.P.shape
        if not bool(self.SQ.min() > 0):
            raise FloatingPointError("the modulators a reached 0 (underflow); use impl='loop'")
        new, zeros = self.P.new_empty, self.P.new_zeros
        GG = new(T, B, 2 * n)  # dL/du: gradient of the gain pre-activations
        GZ = new(T, B, n)  # dL/dz
        GP = self.GP  # dL/dP
        EA = self.EA  # dt_a dL/da_{t+1} = dL/d(W q)
        acc_y, acc_a, acc_bb, acc_sigma = zeros(B, n), zeros(B, n), zeros(B, 2 * n), zeros(B, n)
        e_y, e_bb, g_r, g_q, tmp = new(B, n), new(B, 2 * n), new(B, n), new(B, n), new(B, n)
        # dL/d(state after the step), dL/d(state before it): two pairs of buffers, swapped each step
        gy, ga, gbb = zeros(B, n), zeros(B, n), zeros(B, 2 * n)
        gy_prev, ga_prev, gbb_prev = new(B, n), new(B, n), new(B, 2 * n)
        if g_y is not None:
            gy += g_y
        W_gyT, W_gaT = p.W_g[:n].T, p.W_g[n:].T
        dt_y, dt_a, dt_bb = p.dt[:n], p.dt[n : 2 * n], p.dt[2 * n :]
        two_sigma2 = 2 * p.sigma**2
        with _one_thread_on_cpu(p.z.device):
            for t in reversed(range(T)):
                if g_Y is not None:
                    gy += g_Y[t]
                if g_A is not None:
                    ga += g_A[t]
                y, a, bb, z = self.Y[t], self.A[t], self.BB[t], p.z[t]
                b, b0 = bb[:, :n], bb[:, n:]
                r = self.R[t] if self.rectified else y
                e_a = EA[t]
                acc_y.addcmul_(gy, self.FY[t])
                acc_a.addcmul_(ga, self.FA[t])
                acc_bb.addcmul_(gbb, self.FBB[t])
                torch.mul(gy, dt_y, out=e_y)
                torch.mul(ga, dt_a, out=e_a)
                torch.mul(gbb, dt_bb, out=e_bb)
                torch.sub(gy, e_y, out=gy_prev)
                torch.sub(ga, e_a, out=ga_prev)
                torch.sub(gbb, e_bb, out=gbb_prev)
                # gains: through the sigmoid, back to y and a through W_g
                torch.addcmul(self.G[t], self.G[t], self.G[t], value=-1, out=GG[t]).mul_(e_bb)
                gy_prev.addmm_(GG[t], W_gyT)
                ga_prev.addmm_(GG[t], W_gaT)
                # input drive and input gain: f_y contains b z
                torch.mul(e_y, b, out=GZ[t])
                gbb_prev[:, :n].addcmul_(e_y, z)
                # normalization gain and sigma: f_a contains (sigma b0)^2
                torch.mul(e_a, b0, out=tmp)
                acc_sigma.addcmul_(tmp, b0)
                gbb_prev[:, n:].addcmul_(tmp, two_sigma2)
                # y: (1 - sqrt(a)) P with P = W_r r; a: W q with q = a r^2 (a > 0, so a+ = a)
                torch.addcmul(e_y, e_y, self.SQ[t], value=-1, out=GP[t])
                torch.mm(GP[t], p.W_r, out=g_r)
                torch.mm(e_a, p.W, out=g_q)
                torch.mul(r, g_q, out=tmp)
                ga_prev.addcmul_(tmp, r)
                g_r.addcmul_(tmp, a, value=2)
                torch.mul(e_y, self.P[t], out=tmp)
                ga_prev.addcdiv_(tmp, self.SQ[t], value=-0.5)
                if self.rectified:
                    g_r.mul_(torch.ge(y, 0, out=tmp))
                gy_prev.add_(g_r)
                gy, gy_prev, ga, ga_prev, gbb, gbb_prev = gy_prev, gy, ga_prev, ga, gbb_prev, gbb
        rows = T * B
        GG_rows = GG.reshape(rows, 2 * n)
        g_W_g = torch.cat([self.Y[:-1].reshape(rows, n).T @ GG_rows, self.A[:-1].reshape(rows, n).T @ GG_rows])
        R = self.R if self.rectified else self.Y[:-1]
        g_W_r = GP.reshape(rows, n).T @ R.reshape(rows, n)
        g_W = EA.reshape(rows, n).T @ self.Q.reshape(rows, n)
        g_sigma = 2 * p.sigma * acc_sigma.sum(0)
        g_dt = torch.cat([acc_y.sum(0), acc_a.sum(0), acc_bb.sum(0)])
        _keep_spare(self.key, self.buffers)  # nothing reads them any more
        return GZ, GG, gy, ga, gbb, g_W_g, g_W_r, g_W, g_sigma, g_dt


# ---------------------------------------------------------------------------------------------
# numba engine (CPU): per step and direction the products with torch and two compiled passes


class _NumbaRun:
    """The torch engine's passes with each step's elementwise work compiled (:mod:`organics.networks._compiled_steps`).

    The state is kept as ``YA`` = ``[y, a]`` and ``BB`` = ``[b, b0]`` (width 2n each). Stored per
    step (``store``): the states, the gains' sigmoids ``G``, ``P = W_r r(y)`` and ``f_a``, 8n
    numbers per sequence where the torch engine keeps 16n (0.4 GB against 0.8 GB at B = 256,
    T = 784, n = 64). The backward pass recomputes ``r(y)``, ``q``, ``f_y`` and ``sqrt(a)`` from
    the state, and adds each step's share of the gradients of ``W_r`` and ``W``
    (``GP_t^T r_t``, ``EA_t^T q_t``) as it goes, so that neither the backward pass's
    dL/d(W_r r) and dL/d(W q) nor ``r`` and ``q`` are kept for all T steps. (Keeping them, 12n
    in all, took the same time per training step within the noise of this 2-core machine,
    2026-11-28: the gain is memory.)
    """

    def __init__(self, p: ScanInputs, rectified: bool, store: bool, trajectory: bool) -> None:
        p = ScanInputs(*(t.detach() for t in p))
        T, B, n = p.z.shape
        steps = T if store else 1
        states = T + 1 if store or trajectory else 2
        self.rectified, self.trajectory = rectified, trajectory
        new = p.z.new_empty
        self.key, self.buffers = _spare_or_new(self, p, store, rectified, lambda: (
            new(states, B, 2 * n), new(states, B, 2 * n),  # YA, BB
            new(steps, B, 2 * n), new(steps, B, n), new(steps, B, n),  # G, P, FA
        ))  # fmt: skip
        YA, BB, G, P, FA = self.buffers
        YA[0, :, :n], YA[0, :, n:], BB[0] = p.y0, p.a0, p.bb0
        R, Q, QW = new(B, n), new(B, n), new(B, n)  # r(y) and q of the step, W q
        W_g, W_rT, W_T = p.W_g, p.W_r.T, p.W.T
        arrays = [t.numpy() for t in (p.z, YA, BB, G, P, FA, QW, p.sigma, p.dt)]
        R_np, Q_np = R.numpy(), Q.numpy()
        YA_t, G_t, P_t, u = YA.unbind(0), G.unbind(0), P.unbind(0), p.u.unbind(0)
        with _one_thread_on_cpu(p.z.device):
            for t in range(T):
                i, i_next, k = t % states, (t + 1) % states, t % steps
                _compiled_steps.forward_rates(arrays[1], R_np, Q_np, i, rectified)
                torch.addmm(u[t], YA_t[i], W_g, out=G_t[k]).sigmoid_()
                torch.mm(R, W_rT, out=P_t[k])
                torch.mm(Q, W_T, out=QW)
                _compiled_steps.forward_update(*arrays, t, i, i_next, k)
        self.last = T % states

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final y (B, n) and, if the trajectory was asked for, y and a after each input (T, B, n)."""
        YA = self.buffers[0]
        n = YA.shape[2] // 2
        y = YA[self.last, :, :n].clone()
        if not self.trajectory:
            return y, y.new_empty(0), y.new_empty(0)
        return y, YA[1:, :, :n].clone(), YA[1:, :, n:].clone()

    def backward(self, p: ScanInputs, g_y: Any, g_Y: Any, g_A: Any) -> tuple[torch.Tensor, ...]:
        """Gradients of the loss with respect to every field of :class:`ScanInputs`."""
        p = ScanInputs(*(t.detach() for t in p))
        YA, BB, G, P, FA = self.buffers
        T, B, n = P.shape
        new, rectified = P.new_empty, self.rectified
        GG, GZ = new(T, B, 2 * n), new(T, B, n)  # dL/du, dL/dz
        g_ya, g_bb = P.new_zeros(B, 2 * n), P.new_zeros(B, 2 * n)
        if g_y is not None:
            g_ya[:, :n] = g_y
        g_W_r, g_W = P.new_zeros(n, n), P.new_zeros(n, n)
        GP, EA = new(B, n), new(B, n)  # the step's dL/d(W_r r) and dL/d(W q)
        R, Q = new(B, n), new(B, n)  # the step's r(y) and q
        G_YA, G_R, G_Q = new(B, 2 * n), new(B, n), new(B, n)  # the products' gradients: through W_g, W_r r, W q
        none = P.new_empty(0, B, n)
        acc_dt, acc_sigma = np.zeros(4 * n), np.zeros(n)
        arrays = [t.numpy() for t in (p.z, YA, BB, G, P, FA, p.sigma, p.dt)]
        trajectories = [(none if g is None else g.detach().contiguous()).numpy() for g in (g_Y, g_A)]
        outputs = [t.numpy() for t in (g_ya, g_bb, GG, GZ, GP, EA)]
        R_np, Q_np, G_YA_np, G_R_np, G_Q_np = R.numpy(), Q.numpy(), G_YA.numpy(), G_R.numpy(), G_Q.numpy()
        GG_t, W_gT = GG.unbind(0), p.W_g.T
        with _one_thread_on_cpu(p.z.device):
            for t in reversed(range(T)):
                _compiled_steps.forward_rates(arrays[1], R_np, Q_np, t, rectified)
                if not _compiled_steps.backward_direct(*arrays, *trajectories, *outputs, acc_dt, acc_sigma, t):
                    raise FloatingPointError("the modulators a reached 0 (underflow); use impl='loop'")
                torch.mm(GG_t[t], W_gT, out=G_YA)
                torch.mm(GP, p.W_r, out=G_R)
                torch.mm(EA, p.W, out=G_Q)
                g_W_r.addmm_(GP.T, R)
                g_W.addmm_(EA.T, Q)
                _compiled_steps.backward_recurrent(arrays[1], R_np, outputs[0], G_YA_np, G_R_np, G_Q_np, t, rectified)
        g_W_g = YA[:-1].reshape(T * B, 2 * n).T @ GG.reshape(T * B, 2 * n)
        g_sigma = 2 * p.sigma * torch.from_numpy(acc_sigma).to(p.sigma.dtype)
        g_dt = torch.from_numpy(acc_dt).to(p.dt.dtype)
        _keep_spare(self.key, self.buffers)
        return GZ, GG, g_ya[:, :n], g_ya[:, n:], g_bb, g_W_g, g_W_r, g_W, g_sigma, g_dt


_CPU_RUNS = {"torch": _TorchRun, "numba": _NumbaRun}
"""The forward passes of the engines whose loop runs in Python, by engine."""


# ---------------------------------------------------------------------------------------------
# triton engine (CUDA): per step one matrix product with a block matrix and one Triton kernel


def _block_matrix(p: ScanInputs) -> torch.Tensor:
    """``M`` (4n, 4n) such that ``[r, y, a, q] @ M = [W_r r, recurrent gain drives (2n), W q]``."""
    n = p.W_r.shape[0]
    M = p.W_r.new_zeros(4 * n, 4 * n)
    M[:n, :n] = p.W_r.T
    M[n : 3 * n, n : 3 * n] = p.W_g
    M[3 * n :, 3 * n :] = p.W.T
    return M


def _cdiv(a: int, b: int) -> int:
    """Ceiling division ``-(-a // b)``."""
    return -(-a // b)


@dataclass
class _TritonBuffers:
    """All tensors of a triton-engine run (layout as in :mod:`organics.networks._kernels`)."""

    X: torch.Tensor  # (T+1, B, 6n): [r, y, a, q, b, b0] after t inputs
    O: torch.Tensor  # (T, B, 4n): X[t, :, :4n] @ M
    GO: torch.Tensor  # (T, B, 4n): dL/dO
    GZ: torch.Tensor  # (T, B, n): dL/dz
    D: torch.Tensor  # (2, B, 4n): direct part of dL/d[y, a, b, b0], alternating between steps
    GU: torch.Tensor  # (B, 4n): dL/d[r, y, a, q] through M
    g_traj_y: torch.Tensor  # (T, B, n): dL/dy_t from the trajectory output
    g_traj_a: torch.Tensor  # (T, B, n): dL/da_t from the trajectory output
    acc_dt: torch.Tensor  # (B, 4n)
    acc_sigma: torch.Tensor  # (B, n)

    @classmethod
    def empty(cls, T: int, B: int, n: int, like: torch.Tensor) -> _TritonBuffers:
        new, zeros = like.new_empty, like.new_zeros
        return cls(
            X=new(T + 1, B, 6 * n),
            O=new(T, B, 4 * n),
            GO=new(T, B, 4 * n),
            GZ=new(T, B, n),
            D=zeros(2, B, 4 * n),
            GU=new(B, 4 * n),
            g_traj_y=zeros(T, B, n),
            g_traj_a=zeros(T, B, n),
            acc_dt=zeros(B, 4 * n),
            acc_sigma=zeros(B, n),
        )


class _TritonRun:
    """Forward pass of the triton engine (Triton kernels; CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""

    def __init__(self, p: ScanInputs, rectified: bool, trajectory: bool) -> None:
        from . import _kernels

        T, B, n = p.z.shape
        self.k, self.rectified, self.trajectory = _kernels, rectified, trajectory
        self.buf = buf = _TritonBuffers.empty(T, B, n, p.z)
        self.grid = (_cdiv(B * n, _kernels.BLOCK),)
        self.M = _block_matrix(p)
        self.z, self.u = p.z.contiguous(), p.u.contiguous()
        r0 = relu(p.y0) if rectified else p.y0
        x0 = buf.X[0]
        x0[:, :n] = r0
        x0[:, n : 2 * n] = p.y0
        x0[:, 2 * n : 3 * n] = p.a0
        x0[:, 3 * n : 4 * n] = relu(p.a0) * r0**2
        x0[:, 4 * n :] = p.bb0
        for t in range(T):
            torch.mm(buf.X[t, :, : 4 * n], self.M, out=buf.O[t])
            self.k.forward_step[self.grid](
                buf.X[t], buf.X[t + 1], buf.O[t], self.z[t], self.u[t], p.dt, p.sigma, B * n,
                N=n, RECTIFIED=rectified, BLOCK=self.k.BLOCK,
            )  # fmt: skip

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final y (B, n) and, if the trajectory was asked for, y and a after each input (T, B, n)."""
        X, n = self.buf.X, self.buf.GZ.shape[-1]
        y = X[-1, :, n : 2 * n].clone()
        if not self.trajectory:
            return y, y.new_empty(0), y.new_empty(0)
        return y, X[1:, :, n : 2 * n].clone(), X[1:, :, 2 * n : 3 * n].clone()

    def backward(self, p: ScanInputs, g_y: Any, g_Y: Any, g_A: Any) -> tuple[torch.Tensor, ...]:
        """Gradients of the loss with respect to every field of :class:`ScanInputs`."""
        b, k = self.buf, self.k
        T, B, n = b.GZ.shape
        if g_Y is not None:
            b.g_traj_y.copy_(g_Y)
        if g_A is not None:
            b.g_traj_a.copy_(g_A)
        if g_y is not None:
            b.D[T % 2, :, :n] = g_y
        for t in reversed(range(T)):
            k.backward_step[self.grid](
                b.X[t], b.X[t + 1], b.O[t], self.z[t], self.u[t], b.D[(t + 1) % 2], b.GU, b.g_traj_y[t], b.g_traj_a[t],
                b.D[t % 2], b.GO[t], b.GZ[t], b.acc_dt, b.acc_sigma, p.dt, p.sigma, B * n,
                N=n, RECTIFIED=self.rectified, HAS_GU=t < T - 1, GRAD_Y=g_Y is not None, GRAD_A=g_A is not None,
                BLOCK=k.BLOCK,
            )  # fmt: skip
            torch.mm(b.GO[t], self.M.T, out=b.GU)
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
        if self.rectified:
            g_r = torch.where(y0 >= 0, g_r, 0)
        g_y0 = d0[:, :n] + gu[:, n : 2 * n] + g_r
        g_a0 = d0[:, n : 2 * n] + gu[:, 2 * n : 3 * n] + torch.where(a0 >= 0, gu[:, 3 * n :] * r0**2, 0)
        g_sigma = 2 * p.sigma * b.acc_sigma.sum(0)
        GG = b.GO[:, :, n : 3 * n].clone()
        return b.GZ, GG, g_y0, g_a0, d0[:, 2 * n :].clone(), g_W_g, g_W_r, g_W, g_sigma, b.acc_dt.sum(0)


# ---------------------------------------------------------------------------------------------
# persistent engine (CUDA): one launch per direction for all T steps


class _PersistentRun:
    """Forward pass of the persistent engine; with ``store`` it keeps the states and products of every step.

    ``p`` holds one run (``z`` of shape (T, B, n)) or R runs stacked on a leading axis (``z`` of
    shape (R, T, B, n), every other field too): all R run in the same two launches, and outputs
    and gradients keep the leading axis.
    """

    def __init__(
        self, p: ScanInputs, rectified: bool, store: bool, trajectory: bool, engine: str = "persistent"
    ) -> None:
        from . import _persistent

        if engine == "resident" and p.z.dtype != torch.float32:
            raise ValueError(f"engine='resident' computes in float32 with half-precision products, got {p.z.dtype}")
        self.single = p.z.dim() == 3
        if self.single:
            p = _stacked(p)
        R, T, B, n = p.z.shape
        self.k, self.rectified, self.store, self.trajectory = _persistent, rectified, store, trajectory
        self.T, self.B, self.n, self.NP = T, B, n, _padded_neurons(n)
        self.grid = (_cdiv(B, _persistent.BLOCK_B), R)
        exact = p.z.dtype == torch.float64 or not torch.backends.cuda.matmul.allow_tf32
        self.precision = "fp16" if engine == "resident" else "ieee" if exact else "tf32"
        self.z = p.z.contiguous()
        self.S = p.z.new_empty(R, T + 1 if store else 1, B, 4 * n)
        self.O = p.z.new_empty(R, T if store else 1, B, 4 * n)
        forward_weights = _forward_weights(p)
        self.k.forward[self.grid](
            self.S, self.O, self.z, p.u.contiguous(), p.y0.contiguous(), p.a0.contiguous(), p.bb0.contiguous(),
            *forward_weights, p.sigma.contiguous(), p.dt.contiguous(), T, B,
            N=n, NP=self.NP, BLOCK_B=self.k.BLOCK_B, RECTIFIED=rectified, STORE=store, PRECISION=self.precision,
            num_warps=self.k.NUM_WARPS, num_stages=self.k.NUM_STAGES,
        )  # fmt: skip

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final y ([R,] B, n) and, if the trajectory was asked for, y and a after each input ([R,] T, B, n)."""
        n, S = self.n, self.S[0] if self.single else self.S
        y = S[..., -1, :, :n].clone()
        if not self.trajectory:
            return y, y.new_empty(0), y.new_empty(0)
        return y, S[..., 1:, :, :n].clone(), S[..., 1:, :, n : 2 * n].clone()

    def backward(self, p: ScanInputs, g_y: Any, g_Y: Any, g_A: Any) -> tuple[torch.Tensor, ...]:
        """Gradients of the loss with respect to every field of :class:`ScanInputs` (``p`` as given to ``__init__``)."""
        if self.single:
            p = _stacked(p)
            g_y, g_Y, g_A = (None if g is None else g.unsqueeze(0) for g in (g_y, g_Y, g_A))
        T, B, n, S = self.T, self.B, self.n, self.S
        R = S.shape[0]
        if not bool(S[:, :-1, :, n : 2 * n].min() > 0):
            raise FloatingPointError("the modulators a reached 0 (underflow); use impl='loop'")
        new, zeros = S.new_empty, S.new_zeros
        GO, GZ, D = new(R, T, B, 4 * n), new(R, T, B, n), new(R, B, 4 * n)
        acc_dt, acc_sigma = zeros(R, B, 4 * n), zeros(R, B, n)
        empty = S.new_empty(1)
        backward_weights = (p.W_r, torch.stack([w.mT for w in _gate_blocks(p.W_g)], 1), p.W)  # _persistent: Weights
        self.k.backward[self.grid](
            S, self.O, self.z,
            empty if g_y is None else g_y.contiguous(),
            empty if g_Y is None else g_Y.contiguous(),
            empty if g_A is None else g_A.contiguous(),
            GO, GZ, D, acc_dt, acc_sigma,
            *(w.contiguous() for w in backward_weights), p.sigma.contiguous(), p.dt.contiguous(), T, B,
            N=n, NP=self.NP, BLOCK_B=self.k.BLOCK_B, RECTIFIED=self.rectified,
            GRAD_LAST=g_y is not None, GRAD_Y=g_Y is not None, GRAD_A=g_A is not None, PRECISION=self.precision,
            num_warps=self.k.NUM_WARPS, num_stages=self.k.NUM_STAGES,
        )  # fmt: skip
        rows = T * B
        before = S[:, :-1].reshape(R, rows, 4 * n)
        y, a = before[..., :n], before[..., n : 2 * n]
        r = relu(y) if self.rectified else y
        GO_rows = GO.reshape(R, rows, 4 * n)
        g_W_r = GO_rows[..., :n].mT @ r
        g_W_g = before[..., : 2 * n].mT @ GO_rows[..., n : 3 * n]
        g_W = GO_rows[..., 3 * n :].mT @ (relu(a) * r**2)
        g_sigma = 2 * p.sigma * acc_sigma.sum(1)
        GG = GO[..., n : 3 * n].clone()
        g_state = (D[..., :n], D[..., n : 2 * n], D[..., 2 * n :].clone())
        grads = (GZ, GG, *g_state, g_W_g, g_W_r, g_W, g_sigma, acc_dt.sum(1))
        return tuple(g[0] for g in grads) if self.single else grads


def persistent_kernel_resources(
    hidden_size: int, precision: str = "tf32", capability: int = 90
) -> dict[str, dict[str, int]]:
    """What each persistent kernel needs of a CUDA GPU, compiled here: shared memory, registers, stack, loads.

    Compiles the forward kernel (training: stores every step; evaluation: the last state only)
    and the backward kernel for compute capability ``capability`` (90: an H100) with the launch
    options the engine uses (:data:`~organics.networks._persistent.NUM_WARPS`,
    :data:`~organics.networks._persistent.NUM_STAGES`), float32, the rectified cell, pointers
    aligned to 16 bytes (as Triton specialises a launch on torch's tensors), and reads
    the compiled binary's resource usage (``cuobjdump --dump-resource-usage``). Needs Triton with
    its CUDA compiler, not a GPU, so that a kernel that would not launch is found on any machine
    (:data:`~organics.networks._persistent.SHARED_MEMORY_LIMIT` is an H100's bound per block).

    Parameters
    ----------
    hidden_size : int
        n; the kernels pad it to a power of two of at least ``_persistent.MIN_TILE``.
    precision : {"tf32", "ieee", "fp16"}
        The products: ``"tf32"`` and ``"ieee"`` are the persistent engine's (weights read at
        every step), ``"fp16"`` the resident engine's (weights held in shared memory).
    capability : int
        The compute capability compiled for (90: Hopper).

    Returns
    -------
    dict
        Per kernel (``"forward, training"``, ``"forward, evaluation"``, ``"backward"``):
        ``shared`` (bytes of shared memory per block), ``registers`` (per thread, at most 255) and
        ``stack`` (bytes of stack per thread: registers spilled to local memory); and, counted in
        the machine code, ``wide_loads`` (16-byte loads from global memory) and ``system_loads``
        (loads and stores ordered at system scope, which bypass the L1 cache: what a volatile load
        compiles to). Counted in the body of the step loop (the longest backward branch), what
        each warp issues per step: ``step_instructions``, ``step_barriers`` (``BAR.SYNC``: all
        warps of the block wait), ``step_tensor_core`` (``HMMA``/``HGMMA``) and
        ``step_local_memory`` (``LDL``/``STL``: spilled registers).

    Raises
    ------
    ValueError
        For an unknown ``precision``.
    RuntimeError
        Under the Triton interpreter (``TRITON_INTERPRET=1``), whose kernels are not compiled.
    """
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _persistent

    check_choice("precision", precision, ("tf32", "ieee", "fp16"))
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the Triton interpreter does not compile kernels (TRITON_INTERPRET=1)")
    NP = _padded_neurons(hidden_size)
    common = {"N": hidden_size, "NP": NP, "BLOCK_B": _persistent.BLOCK_B, "RECTIFIED": True, "PRECISION": precision}
    kernels = {
        "forward, training": (_persistent.forward, {**common, "STORE": True}),
        "forward, evaluation": (_persistent.forward, {**common, "STORE": False}),
        "backward": (_persistent.backward, {**common, "GRAD_LAST": True, "GRAD_Y": True, "GRAD_A": True}),
    }
    options = {"num_warps": _persistent.NUM_WARPS, "num_stages": _persistent.NUM_STAGES}
    resources = {}
    for name, (kernel, constants) in kernels.items():
        names = list(kernel.arg_names)
        signature = {arg: "constexpr" if arg in constants else "i32" if arg in ("T", "B") else "*fp32" for arg in names}
        aligned = {(names.index(arg),): [["tt.divisibility", 16]] for arg in names if signature[arg] == "*fp32"}
        source = ASTSource(
            kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()}, attrs=aligned
        )  # fmt: skip
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
        with tempfile.TemporaryDirectory() as folder:
            cubin = os.path.join(folder, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage, sass = (
                subprocess.run(
                    [triton.knobs.nvidia.cuobjdump.path, flag, cubin], capture_output=True, text=True, check=True
                ).stdout
                for flag in ("--dump-resource-usage", "--dump-sass")
            )
        fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line for item in line.split())
        resources[name] = {
            "shared": int(compiled.metadata.shared),
            "registers": int(fields["REG"]),
            "stack": int(fields["STACK"]),
            "wide_loads": sass.count("LDG.E.128"),
            "system_loads": sass.count(".STRONG.SYS"),
            **_step_loop_counts(sass),
        }
    return resources


def _step_loop_counts(sass: str) -> dict[str, int]:
    """Instructions of the longest loop of a kernel's machine code (``cuobjdump --dump-sass``), by kind.

    The loop is the span from the target of the backward branch that jumps farthest back to that
    branch; ``persistent_kernel_resources`` documents the counts.
    """
    code = re.findall(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][^;]*);", sass)
    body = [(int(address, 16), text) for address, text in code]
    loops = [
        (target, address)
        for address, text in body
        for target in (int(m, 16) for m in re.findall(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text))
        if target < address
    ]
    first, last = max(loops, key=lambda span: span[1] - span[0])
    ops = [text.split()[1] if text.startswith("@") else text.split()[0] for _, text in body]
    ops = [op for (address, _), op in zip(body, ops, strict=True) if first <= address <= last]
    return {
        "step_instructions": len(ops),
        "step_barriers": sum(op.startswith("BAR.SYNC") for op in ops),
        "step_tensor_core": sum(op.startswith(("HMMA", "HGMMA")) for op in ops),
        "step_local_memory": sum(op.startswith(("LDL", "STL")) for op in ops),
    }


def _forward_weights(p: ScanInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W_r^T``, the gate blocks stacked on axis 1 and ``W^T`` (n x n each) as the persistent forward kernel takes
    them (``_persistent``'s *Weights*)."""
    gates = torch.stack([w.contiguous() for w in _gate_blocks(p.W_g)], 1)
    return p.W_r.mT.contiguous(), gates, p.W.mT.contiguous()


def _gate_blocks(W_g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four n x n blocks of (R, 2n, 2n) gate weights in ``_persistent.GATE_BLOCKS``' order: y -> b, a -> b, y -> b0,
    a -> b0 (``[y, a] W_g = [g_b, g_b0]``)."""
    n = W_g.shape[-1] // 2
    return W_g[..., :n, :n], W_g[..., n:, :n], W_g[..., :n, n:], W_g[..., n:, n:]


def _padded_neurons(n: int) -> int:
    """``NP`` of the persistent kernels: ``n`` padded to a power of two, at least ``_persistent.MIN_TILE``."""
    from . import _persistent

    return max(_persistent.MIN_TILE, triton_next_power_of_2(n))


def _stacked(p: ScanInputs) -> ScanInputs:
    """One run's inputs as a stack of one run (a leading axis of length 1 on every field)."""
    return ScanInputs(*(t.unsqueeze(0) for t in p))


def triton_next_power_of_2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << (n - 1).bit_length()
