"""Persistent Triton kernels of the ORGaNICs scan: one launch runs all T steps (see :mod:`organics.networks.scan`).

Each program owns a tile of ``BLOCK_B`` sequences and keeps their state ``(y, a, b, b0)`` in
registers from the first step to the last; per step it does the six recurrent products with
``tl.dot`` and all elementwise work of the Euler step. ``PRECISION`` says where the weights come
from. With ``"ieee"`` or ``"tf32"`` (the ``"persistent"`` engine) they are read from global
memory at every step, where the L2 cache keeps them: six n x n float32 matrices are too large
for shared memory at n = 128, so each passes through one shared-memory tile (see
:data:`NUM_STAGES`), in 16-byte loads (see :func:`_opaque_zero`). With ``"fp16"`` (the
``"resident"`` engine) they are loaded once, in half precision, and stay in shared memory for
all T steps (192 KiB at n = 128); each product scales the rows of its left operand into half
precision (:func:`_half`; two products summed in one accumulator share the scale,
:func:`_half_pair`) and accumulates in float32. (Joining the four gate products into one
``[y, a] W_g`` with K = 2n, tried on 2026-11-27, compiled to more instructions and barriers per
step: columns interleaved by ``tl.join`` and split again cost more layout changes than the three
products it saved; see ``scan.persistent_kernel_resources``.)
The backward kernel walks the steps backwards with the gradient of the state in registers and
does the same products with the transposed weights.

Register layouts: Triton gives every tile a layout of its entries over threads and registers. A
tile loaded from global memory gets a coalesced one in which each warp holds whole rows; a
product of ``tl.dot`` comes out in the tensor cores' (MMA) layout, in which the eight warps
split the columns. Elementwise work that mixes the two gets one layout by Triton's propagation,
which starts from the loads and products latest in the program and, where layouts conflict,
prefers an MMA layout; every tile that then changes layout passes through shared memory, with
a barrier at which all warps wait. The kernels steer this: each product passes through
:func:`_unpinned`, after which its layout is no MMA layout, and each step's last load feeds the
state carried to the next step (the forward kernel loads the step's inputs after the products,
the backward kernel the next step's ``y`` at the end of the step). All elementwise work then
stays in the loads' layout, the row maxima of :func:`_half` are reductions within a warp, and
only the products change layout. The left operands of a step's products are all scaled and
stored to shared memory before the first product (one barrier for all), and the ``"fp16"``
kernels sum the two products of each gate in one accumulator (:func:`_resident_sum`): four
changes of layout per step instead of six. Compiled for sm_90 by Triton 3.6 (an H100 window's)
at n = 128, the backward kernel's step (its longest branch) went from 2,033 instructions, 74
barriers and 142 spill accesses per warp to 1,170, 10 and 0 (the elementwise work had been in
the MMA layout: 25 tiles changed layout per step), the ``"fp16"`` forward kernel's from 982
instructions and 26 barriers to 860 and 10 (``results/benchmarks/kernel_counts_triton3.6.0.json``,
commits 0da13b1 and a955dee; the file holds 7867695, which compiles these two kernels alike).

Weights (each with a leading run axis) as the kernels take them: ``W_r``, the gate weights and
``W``, each as its product takes it (``x @ M`` in the forward kernel, ``g @ M`` in the backward
kernel): the n x n matrices ``W_r^T`` and ``W^T`` (forward) or ``W_r`` and ``W`` (backward),
and the four n x n blocks of ``W_g`` stacked in the order y -> b, a -> b, y -> b0, a -> b0
(:data:`GATE_BLOCKS`), transposed in the backward kernel.

Memory: the forward pass of a training step stores the states ``S`` (T+1, B, 4n) and, in ``O``
(T, B, 4n), what the backward pass needs of each step besides the state, so that it reads them
instead of recomputing the products; the backward pass writes ``GO`` (T, B, 4n) and ``GZ``
(T, B, n), from which the weight gradients are one matrix product each over all T x B rows. At
B = 256, T = 784, n = 128 in float32 that is 0.4 GB per buffer of width 4n.

Buffers (row i of the batch, neurons padded to ``NP``, a power of two >= :data:`MIN_TILE`, with zeros):

- ``S[t]`` = ``[y, a, b, b0]`` after t inputs; ``O[t]`` = ``[p, s_b, s_b0, f_a]`` of the step from
  ``S[t]``: the product ``p = W_r r`` (``r = r(y)``), the gates' sigmoids and a's rate of change
  ``f_a = (sigma b0)^2 + W q - a`` (``q = a+ r^2``);
- ``GO[t]`` = the gradient of the loss with respect to the step's four products ``[W_r r,
  W_by y + W_ba a, W_b0y y + W_b0a a, W q]``; ``GZ[t]`` = dL/dz_t; ``D`` (B, 4n): dL/dS[0] on
  exit;
- the step-size and sigma gradients as partial sums over the batch: the backward kernel sums
  each program's rows ``i``, ``i + 8`` at n > 64 (where one thread holds both, :func:`_fold`) and
  writes them to the tile's first eight rows (zeros elsewhere).

Several runs in one launch: every buffer and parameter has a leading run axis (R runs of the
same shape: independent networks trained side by side, e.g. the rows of Table 2), and the
launch grid is ``(tiles of the batch, R)``: program ``(i, j)`` owns tile ``i`` of run ``j``. At
B = 256 one run fills 16 programs, far fewer than an H100's 132 multiprocessors; R runs in one
launch fill R times as many.

Under ``TRITON_INTERPRET=1`` the kernels run on the CPU, which the tests use (also in float64).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "BLOCK_B", "GATE_BLOCKS", "MIN_TILE", "NUM_STAGES", "NUM_WARPS", "SHARED_MEMORY_LIMIT", "backward", "forward",
]  # fmt: skip

BLOCK_B = 16
"""Sequences per program (the smallest tile ``tl.dot`` takes)."""

MIN_TILE = 32
"""The smallest padded neuron count ``NP``: ``tl.dot`` takes no dimension under 16, and the kernels have been
compiled and checked on GPUs with tiles of 32 and more."""

GATE_BLOCKS = ("y -> b", "a -> b", "y -> b0", "a -> b0")
"""The four n x n blocks of ``W_g`` in the order the kernels take them stacked (:func:`_gate_pointers`)."""

NUM_STAGES = 1
"""Software-pipelining stages of the launch: one, so that Triton keeps a single weight tile in shared memory.

With Triton's default of three, the pipeliner gives each of the six n x n weight loads of the
step loop its own multi-buffered shared-memory slot: at n = 128 the forward kernel needed
794,624 bytes (an H100's blocks may use 232,448; measured on the GPU on 2026-11-27, and the same
number when compiled for sm_90 on the CPU). With one stage it needs 73,728 (forward) and 98,304
bytes (backward), checked by compiling for sm_90 in the tests.
"""

NUM_WARPS = 8
"""Warps per program: with four, the 128 x 128 weight tile passing through registers spills far more."""

SHARED_MEMORY_LIMIT = 232_448
"""Bytes of shared memory one block may use on an H100 (sm_90), the bound the tests check."""


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _opaque_zero(t):
    """Zero that the compiler cannot prove zero: the step index ``t`` times the grid's third index (always 0).

    Added to the weight pointers, it makes their loads depend on the step, so that the compiler
    keeps them inside the step loop: hoisted out of a loop without stores (the evaluation pass),
    the six tiles would stay in shared memory together, 409,600 bytes at n = 128 (compiled for
    sm_90), more than a block may use. Marked a multiple of 16, it leaves the loads vectorised
    and cached, as a volatile load (the earlier way to keep them in the loop) did not: that
    compiled to one system-scope load of 4 bytes per element.
    """
    return tl.multiple_of(t * tl.program_id(2), 16)


@triton.jit
def _weights(ptr, NP: tl.constexpr, N: tl.constexpr):
    """An n x n matrix (row-major, n = N) as an NP x NP tile, zero outside.

    Inside the step loop the caller offsets ``ptr`` by :func:`_opaque_zero`.
    """
    i = tl.arange(0, NP)
    mask = (i[:, None] < N) & (i[None, :] < N)
    return tl.load(ptr + i[:, None] * N + i[None, :], mask=mask, other=0.0)


@triton.jit
def _half(x):
    """``x`` (rows of the batch) in half precision, each row divided by its largest magnitude, and those scales.

    Per-row scaling keeps half precision's 11-bit significand for every row, however small its
    entries (gradients of a loss averaged over a batch would otherwise fall below half
    precision's range); the product is scaled back in float32. Each row is multiplied by the
    reciprocal of its scale (one division per row, not per entry).
    """
    scale = tl.max(tl.abs(x), axis=1)
    scale = tl.where(scale > 0.0, scale, 1.0)
    return (x * (1.0 / scale)[:, None]).to(tl.float16), scale[:, None]


@triton.jit
def _half_pair(x, y):
    """``x`` and ``y`` in half precision, each row of both divided by the larger of their largest magnitudes, and
    those scales: the two left operands of products summed in one accumulator (:func:`_resident_sum`).

    Half precision keeps 11 significant bits down to 6e-5 of the scale; only where one of the
    two rows is that much smaller than the other do its entries lose bits, and then its product
    is as much smaller than the other's in the sum.
    """
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), tl.max(tl.abs(y), axis=1))
    scale = tl.where(scale > 0.0, scale, 1.0)
    inverse = (1.0 / scale)[:, None]
    return (x * inverse).to(tl.float16), (y * inverse).to(tl.float16), scale[:, None]


@triton.jit
def _resident_sum(xh, w_x, yh, w_y, scale):
    """``x @ w_x + y @ w_y`` from ``x`` and ``y`` scaled into half precision together (:func:`_half_pair`), the
    two products accumulated in one float32 tile: one change of layout instead of two."""
    return _unpinned(tl.dot(yh, w_y, tl.dot(xh, w_x, out_dtype=tl.float32))) * scale


@triton.jit
def _resident_scaled(xh, scale, w):
    """``x @ w`` in the ``"fp16"`` kernels, ``w`` a half-precision tile held in shared memory, from ``x`` scaled
    into half precision (:func:`_half`) and its row scales: accumulated in float32 and scaled back."""
    return _unpinned(tl.dot(xh, w, out_dtype=tl.float32)) * scale


@triton.jit
def _unpinned(d):
    """The product ``d`` of a ``tl.dot``, value unchanged, split into column pairs and joined again.

    Triton lays out elementwise work that mixes loaded tiles with a product in the product's
    (MMA) layout, and then moves every loaded and stored tile through shared memory. After the
    split and join the product's layout is no longer an MMA layout, and the backward kernel's
    elementwise work keeps the layout of its loads (with :func:`_half`'s row reductions within
    a warp); only the products are moved.
    """
    lo, hi = tl.split(tl.reshape(d, (d.shape[0], d.shape[1] // 2, 2)))
    return tl.reshape(tl.join(lo, hi), d.shape)


@triton.jit
def _resident_tile(ptr, NP: tl.constexpr, N: tl.constexpr):
    """An n x n matrix (row-major) of the ``"fp16"`` kernels as an NP x NP tile in half precision, loaded once."""
    return _weights(ptr, NP, N).to(tl.float16)


@triton.jit
def _resident_weights(w_r_ptr, w_by_ptr, w_ba_ptr, w_b0y_ptr, w_b0a_ptr, w_ptr, NP: tl.constexpr, N: tl.constexpr):
    """The six n x n matrices of the ``"fp16"`` kernels (:func:`_resident_tile`), in the order of the pointers."""
    return (
        _resident_tile(w_r_ptr, NP, N),
        _resident_tile(w_by_ptr, NP, N),
        _resident_tile(w_ba_ptr, NP, N),
        _resident_tile(w_b0y_ptr, NP, N),
        _resident_tile(w_b0a_ptr, NP, N),
        _resident_tile(w_ptr, NP, N),
    )


@triton.jit
def _read_product(x, ptr, t, NP: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    """``x @ M`` in the ``"ieee"`` and ``"tf32"`` kernels: ``M`` (n x n, row-major) read at step ``t`` (see
    :func:`_opaque_zero`)."""
    return _unpinned(tl.dot(x, _weights(ptr + _opaque_zero(t), NP, N), input_precision=PRECISION))


@triton.jit
def _read_sum(x, x_ptr, y, y_ptr, t, NP: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    """``x @ M + y @ K`` in the ``"ieee"`` and ``"tf32"`` kernels (``M``, ``K`` as in :func:`_read_product`), the two
    products accumulated in one tile: one change of layout instead of two (as :func:`_resident_sum`)."""
    xm = tl.dot(x, _weights(x_ptr + _opaque_zero(t), NP, N), input_precision=PRECISION)
    return _unpinned(tl.dot(y, _weights(y_ptr + _opaque_zero(t), NP, N), xm, input_precision=PRECISION))


@triton.jit
def _vector(ptr, NP: tl.constexpr, N: tl.constexpr):
    j = tl.arange(0, NP)
    return tl.load(ptr + j, mask=j < N, other=0.0)


@triton.jit
def _rates(sigma_ptr, dt_ptr, NP: tl.constexpr, N: tl.constexpr):
    """``sigma`` and the step sizes of y, a, b and b0, each as a row (1, NP) that broadcasts over the batch."""
    return (
        _vector(sigma_ptr, NP, N)[None, :],
        _vector(dt_ptr, NP, N)[None, :],
        _vector(dt_ptr + N, NP, N)[None, :],
        _vector(dt_ptr + 2 * N, NP, N)[None, :],
        _vector(dt_ptr + 3 * N, NP, N)[None, :],
    )


@triton.jit
def _run_parameters(run, N: tl.constexpr, w_r_ptr, w_g_ptr, w_ptr, sigma_ptr, dt_ptr):
    """The weight pointers (n x n matrices, four of them for the gates), ``sigma`` and the step sizes, moved to
    ``run``'s own."""
    step = run * N * N
    return w_r_ptr + step, w_g_ptr + 4 * step, w_ptr + step, sigma_ptr + run * N, dt_ptr + run * 4 * N


@triton.jit
def _gate_pointers(w_g_ptr, N: tl.constexpr):
    """Pointers to the four n x n gate blocks stacked at ``w_g_ptr``, in :data:`GATE_BLOCKS`' order."""
    return w_g_ptr, w_g_ptr + N * N, w_g_ptr + 2 * N * N, w_g_ptr + 3 * N * N


@triton.jit
def _step_inputs(z_ptr, u_ptr, t, B, mask, off_n, off_2n, N: tl.constexpr):
    """The input drives of step ``t`` for this program's rows: ``z_t`` and the gates' ``u_t`` (b and b0 halves)."""
    u = u_ptr + t * B * 2 * N + off_2n
    return (
        tl.load(z_ptr + t * B * N + off_n, mask=mask, other=0.0),
        tl.load(u, mask=mask, other=0.0),
        tl.load(u + N, mask=mask, other=0.0),
    )


@triton.jit
def _fold(x, ROWS: tl.constexpr):
    """``x`` (BLOCK_B, NP) summed to ``ROWS`` rows: row ``i`` adds ``x``'s rows ``i``, ``i + ROWS``, ...."""
    if ROWS == x.shape[0]:
        return x
    return tl.sum(tl.reshape(x, (x.shape[0] // ROWS, ROWS, x.shape[1])), axis=0)


@triton.jit
def _tile(B, N: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr, BLOCK_B: tl.constexpr):
    """The first ``ROWS`` of this program's rows of the batch: the mask and the offsets into (B, n), (B, 2n) and
    (B, 4n) buffers."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, ROWS)
    cols = tl.arange(0, NP)
    mask = (rows[:, None] < B) & (cols[None, :] < N)
    return (
        mask,
        rows[:, None] * N + cols[None, :],
        rows[:, None] * (2 * N) + cols[None, :],
        rows[:, None] * (4 * N) + cols[None, :],
    )


@triton.jit
def forward(
    s_ptr, o_ptr, z_ptr, u_ptr, y0_ptr, a0_ptr, bb0_ptr,
    w_r_ptr, w_g_ptr, w_ptr, sigma_ptr, dt_ptr,
    T, B,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr,
    RECTIFIED: tl.constexpr, STORE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """All T Euler steps for ``BLOCK_B`` sequences; ``S`` and ``O`` of every step if ``STORE``, else the last ``S``.

    The weight pointers hold the matrices as ``x @ M`` takes them, ``W_r^T``, the gate weights and ``W^T``
    (see the module's *Weights*).
    """
    run = tl.program_id(1).to(tl.int64)  # this program's run: move every pointer to its slice
    if STORE:  # S (R, T+1, B, 4n), O (R, T, B, 4n)
        s_ptr += run * (T + 1) * B * 4 * N
        o_ptr += run * T * B * 4 * N
    else:  # S (R, 1, B, 4n): the last state only
        s_ptr += run * B * 4 * N
    z_ptr += run * T * B * N
    u_ptr += run * T * B * 2 * N
    y0_ptr += run * B * N
    a0_ptr += run * B * N
    bb0_ptr += run * B * 2 * N
    w_r_ptr, w_g_ptr, w_ptr, sigma_ptr, dt_ptr = _run_parameters(run, N, w_r_ptr, w_g_ptr, w_ptr, sigma_ptr, dt_ptr)
    w_by_ptr, w_ba_ptr, w_b0y_ptr, w_b0a_ptr = _gate_pointers(w_g_ptr, N)
    if PRECISION == "fp16":  # the six matrices, loaded once in half precision, stay in shared memory
        w_r, w_by, w_ba, w_b0y, w_b0a, w = _resident_weights(
            w_r_ptr, w_by_ptr, w_ba_ptr, w_b0y_ptr, w_b0a_ptr, w_ptr, NP, N
        )
    mask, off_n, off_2n, off_4n = _tile(B, N, NP, BLOCK_B, BLOCK_B)
    y = tl.load(y0_ptr + off_n, mask=mask, other=0.0)
    a = tl.load(a0_ptr + off_n, mask=mask, other=0.0)
    b = tl.load(bb0_ptr + off_2n, mask=mask, other=0.0)
    b0 = tl.load(bb0_ptr + off_2n + N, mask=mask, other=0.0)
    sigma, dt_y, dt_a, dt_b, dt_b0 = _rates(sigma_ptr, dt_ptr, NP, N)
    if STORE:
        tl.store(s_ptr + off_4n, y, mask=mask)
        tl.store(s_ptr + off_4n + N, a, mask=mask)
        tl.store(s_ptr + off_4n + 2 * N, b, mask=mask)
        tl.store(s_ptr + off_4n + 3 * N, b0, mask=mask)
    for t in range(T):
        if RECTIFIED:
            r = tl.maximum(y, 0.0)
        else:
            r = y
        a_pos = tl.maximum(a, 0.0)
        if PRECISION == "fp16":  # the tiles held in shared memory
            # every left operand scaled before the first product (one barrier for all their trips to shared memory)
            yh, ah, ya_scale = _half_pair(y, a)  # r(y) takes y's scale: relu commutes with a positive scaling
            qh, q_scale = _half(a_pos * r * r)
            if RECTIFIED:
                rh = tl.maximum(yh, 0.0).to(tl.float16)
            else:
                rh = yh
            p = _resident_scaled(rh, ya_scale, w_r)
            g_b = _resident_sum(yh, w_by, ah, w_ba, ya_scale)
            g_b0 = _resident_sum(yh, w_b0y, ah, w_b0a, ya_scale)
            qw = _resident_scaled(qh, q_scale, w)
        else:  # each tile read at this step (offset by _opaque_zero)
            p = _read_product(r, w_r_ptr, t, NP, N, PRECISION)
            g_b = _read_sum(y, w_by_ptr, a, w_ba_ptr, t, NP, N, PRECISION)
            g_b0 = _read_sum(y, w_b0y_ptr, a, w_b0a_ptr, t, NP, N, PRECISION)
            qw = _read_product(a_pos * r * r, w_ptr, t, NP, N, PRECISION)
        # the step's inputs after the products, the step's last loads (module docstring: Register layouts); loaded
        # before them they cost more instructions and barriers per step (compiled for sm_90, n = 128, "fp16": 56
        # barriers against 32 on 2026-11-27), and held during them they spill (TF32)
        z, u_b, u_b0 = _step_inputs(z_ptr, u_ptr, t, B, mask, off_n, off_2n, N)
        s_b = _sigmoid(g_b + u_b)
        s_b0 = _sigmoid(g_b0 + u_b0)
        sb0 = sigma * b0
        f_y = (1.0 - tl.sqrt(a_pos)) * p + b * z - y
        f_a = sb0 * sb0 + qw - a
        if STORE:
            o = o_ptr + t * B * 4 * N + off_4n
            tl.store(o, p, mask=mask)
            tl.store(o + N, s_b, mask=mask)
            tl.store(o + 2 * N, s_b0, mask=mask)
            tl.store(o + 3 * N, f_a, mask=mask)
        y = y + dt_y * f_y
        a = a + dt_a * f_a
        b = b + dt_b * (s_b - b)
        b0 = b0 + dt_b0 * (s_b0 - b0)
        if STORE:
            s = s_ptr + (t + 1) * B * 4 * N + off_4n
            tl.store(s, y, mask=mask)
            tl.store(s + N, a, mask=mask)
            tl.store(s + 2 * N, b, mask=mask)
            tl.store(s + 3 * N, b0, mask=mask)
    if not STORE:
        tl.store(s_ptr + off_4n, y, mask=mask)
        tl.store(s_ptr + off_4n + N, a, mask=mask)
        tl.store(s_ptr + off_4n + 2 * N, b, mask=mask)
        tl.store(s_ptr + off_4n + 3 * N, b0, mask=mask)


@triton.jit
def backward(
    s_ptr, o_ptr, z_ptr, g_last_ptr, g_traj_y_ptr, g_traj_a_ptr,
    go_ptr, gz_ptr, d_ptr, acc_dt_ptr, acc_sigma_ptr,
    w_r_ptr, w_g_ptr, w_ptr, sigma_ptr, dt_ptr,
    T, B,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_B: tl.constexpr,
    RECTIFIED: tl.constexpr, GRAD_LAST: tl.constexpr, GRAD_Y: tl.constexpr, GRAD_A: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Backpropagate through all T steps, last to first, for ``BLOCK_B`` sequences.

    The weight pointers hold the matrices as ``g @ M`` takes them: ``W_r``, the gate weights and ``W``
    (the transposes of the forward kernel's; see the module's *Weights*). ``g_last`` is dL/dy_T;
    ``g_traj_y[t]``, ``g_traj_a[t]`` are dL/dy, dL/da after input t. Writes ``GO``, ``GZ``,
    dL/dS[0] into ``D`` and the per-row accumulators of the step-size and sigma gradients.
    """
    run = tl.program_id(1).to(tl.int64)  # this program's run: move every pointer to its slice
    s_ptr += run * (T + 1) * B * 4 * N
    o_ptr += run * T * B * 4 * N
    z_ptr += run * T * B * N
    if GRAD_LAST:
        g_last_ptr += run * B * N
    if GRAD_Y:
        g_traj_y_ptr += run * T * B * N
    if GRAD_A:
        g_traj_a_ptr += run * T * B * N
    go_ptr += run * T * B * 4 * N
    gz_ptr += run * T * B * N
    d_ptr += run * B * 4 * N
    acc_dt_ptr += run * B * 4 * N
    acc_sigma_ptr += run * B * N
    w_r_ptr, w_g_ptr, w_ptr, sigma_ptr, dt_ptr = _run_parameters(run, N, w_r_ptr, w_g_ptr, w_ptr, sigma_ptr, dt_ptr)
    w_by_ptr, w_ba_ptr, w_b0y_ptr, w_b0a_ptr = _gate_pointers(w_g_ptr, N)
    if PRECISION == "fp16":  # the six matrices, loaded once in half precision, stay in shared memory
        w_r, w_by, w_ba, w_b0y, w_b0a, w = _resident_weights(
            w_r_ptr, w_by_ptr, w_ba_ptr, w_b0y_ptr, w_b0a_ptr, w_ptr, NP, N
        )
    mask, off_n, _, off_4n = _tile(B, N, NP, BLOCK_B, BLOCK_B)
    sigma, dt_y, dt_a, dt_b, dt_b0 = _rates(sigma_ptr, dt_ptr, NP, N)
    zero = tl.zeros((BLOCK_B, NP), dtype=s_ptr.dtype.element_ty)
    g_y, g_a, g_b, g_b0 = zero, zero, zero, zero  # dL/dS[t + 1]
    # the step-size and sigma gradients' accumulators: at NP >= 128 a thread holds rows i and i + 8 of a tile, summed
    # in registers, and the accumulators take half the registers (without, the step spilled 92 accesses per warp)
    ACC_ROWS: tl.constexpr = BLOCK_B // 2 if NP >= 128 else BLOCK_B
    acc = tl.zeros((ACC_ROWS, NP), dtype=s_ptr.dtype.element_ty)
    acc_y, acc_a, acc_b, acc_b0, acc_sigma = acc, acc, acc, acc, acc
    if GRAD_LAST:
        g_y += tl.load(g_last_ptr + off_n, mask=mask, other=0.0)
    y = tl.load(s_ptr + (T - 1) * B * 4 * N + off_4n, mask=mask, other=0.0)  # then at the end of each step
    for k in range(T):
        t = T - 1 - k
        if GRAD_Y:
            g_y += tl.load(g_traj_y_ptr + t * B * N + off_n, mask=mask, other=0.0)
        if GRAD_A:
            g_a += tl.load(g_traj_a_ptr + t * B * N + off_n, mask=mask, other=0.0)
        # the step from S[t]: recompute its elementwise quantities from the stored S[t] and O[t]
        s = s_ptr + t * B * 4 * N + off_4n
        o = o_ptr + t * B * 4 * N + off_4n
        a = tl.load(s + N, mask=mask, other=0.0)
        b = tl.load(s + 2 * N, mask=mask, other=0.0)
        b0 = tl.load(s + 3 * N, mask=mask, other=0.0)
        p = tl.load(o, mask=mask, other=0.0)
        s_b = tl.load(o + N, mask=mask, other=0.0)
        s_b0 = tl.load(o + 2 * N, mask=mask, other=0.0)
        f_a = tl.load(o + 3 * N, mask=mask, other=0.0)
        z = tl.load(z_ptr + t * B * N + off_n, mask=mask, other=0.0)
        if RECTIFIED:
            r = tl.maximum(y, 0.0)
        else:
            r = y
        a_pos = tl.maximum(a, 0.0)
        sq = tl.sqrt(a_pos)
        f_y = (1.0 - sq) * p + b * z - y
        # step sizes and sigma
        acc_y += _fold(g_y * f_y, ACC_ROWS)
        acc_a += _fold(g_a * f_a, ACC_ROWS)
        acc_b += _fold(g_b * (s_b - b), ACC_ROWS)
        acc_b0 += _fold(g_b0 * (s_b0 - b0), ACC_ROWS)
        e_y = g_y * dt_y
        e_a = g_a * dt_a
        e_b = g_b * dt_b
        e_b0 = g_b0 * dt_b0
        acc_sigma += _fold(e_a * b0 * b0, ACC_ROWS)
        # GO[t], the gradients of the step's four products, and dL/dz_t
        go_p = e_y * (1.0 - sq)
        go_b = e_b * s_b * (1.0 - s_b)
        go_b0 = e_b0 * s_b0 * (1.0 - s_b0)
        go = go_ptr + t * B * 4 * N + off_4n
        tl.store(go, go_p, mask=mask)
        tl.store(go + N, go_b, mask=mask)
        tl.store(go + 2 * N, go_b0, mask=mask)
        tl.store(go + 3 * N, e_a, mask=mask)
        tl.store(gz_ptr + t * B * N + off_n, e_y * b, mask=mask)
        # dL/dS[t]: the direct path of the Euler step (finished before the products, so that fewer values stay
        # live across them) plus the recurrent products
        d_y = g_y * (1.0 - dt_y)
        d_a = g_a * (1.0 - dt_a) + tl.where(a > 0.0, -e_y * p / (2.0 * tl.where(a > 0.0, sq, 1.0)), 0.0)
        q_r = 2.0 * a_pos * r  # dq/dr
        q_a = tl.where(a >= 0.0, r * r, 0.0)  # dq/da
        g_b = g_b * (1.0 - dt_b) + e_y * z
        g_b0 = g_b0 * (1.0 - dt_b0) + 2.0 * sigma * sigma * e_a * b0
        if PRECISION == "fp16":
            eah, ea_s = _half(e_a)  # every left operand scaled before the first product, as in the forward kernel
            gph, gp_s = _half(go_p)
            gbh, gb0h, gate_scale = _half_pair(go_b, go_b0)
            g_q = _resident_scaled(eah, ea_s, w)
            g_r = _resident_scaled(gph, gp_s, w_r) + g_q * q_r
            by = _resident_sum(gbh, w_by, gb0h, w_b0y, gate_scale)
            ba = _resident_sum(gbh, w_ba, gb0h, w_b0a, gate_scale)
        else:
            g_q = _read_product(e_a, w_ptr, t, NP, N, PRECISION)
            g_r = _read_product(go_p, w_r_ptr, t, NP, N, PRECISION) + g_q * q_r
            by = _read_sum(go_b, w_by_ptr, go_b0, w_b0y_ptr, t, NP, N, PRECISION)
            ba = _read_sum(go_b, w_ba_ptr, go_b0, w_b0a_ptr, t, NP, N, PRECISION)
        if RECTIFIED:
            g_r = tl.where(y >= 0.0, g_r, 0.0)
        g_y = d_y + g_r + by
        g_a = d_a + g_q * q_a + ba
        # S[t - 1]'s y for the next step: the step's last load (module docstring: Register layouts)
        y = tl.load(s_ptr + (t - 1) * B * 4 * N + off_4n, mask=mask & (t > 0), other=0.0)
    tl.store(d_ptr + off_4n, g_y, mask=mask)
    tl.store(d_ptr + off_4n + N, g_a, mask=mask)
    tl.store(d_ptr + off_4n + 2 * N, g_b, mask=mask)
    tl.store(d_ptr + off_4n + 3 * N, g_b0, mask=mask)
    mask, off_n, _, off_4n = _tile(B, N, NP, ACC_ROWS, BLOCK_B)  # the partial sums: the tile's first rows
    tl.store(acc_dt_ptr + off_4n, acc_y, mask=mask)
    tl.store(acc_dt_ptr + off_4n + N, acc_a, mask=mask)
    tl.store(acc_dt_ptr + off_4n + 2 * N, acc_b, mask=mask)
    tl.store(acc_dt_ptr + off_4n + 3 * N, acc_b0, mask=mask)
    tl.store(acc_sigma_ptr + off_n, acc_sigma, mask=mask)
