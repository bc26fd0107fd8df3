"""Triton kernels for one time step of the ORGaNICs scan's triton engine (see :mod:`organics.networks.scan`).

Each kernel does all the elementwise work of one step for the whole batch in one launch; the
recurrent matrix products stay with cuBLAS. Buffers (row i of the batch, n = ``N`` neurons):

- ``X`` (B, 6n) per step: ``[r, y, a, q, b, b0]`` with ``r = r(y)`` and ``q = a+ r^2``, so that
  ``X[:, :4n] @ M`` gives all recurrent drives at once;
- ``O`` (B, 4n): ``[W_r r, W_by y + W_ba a, W_b0y y + W_b0a a, W q]`` (pre-activations, without input);
- ``U`` (B, 2n): input parts of the gain drives; ``Z`` (B, n): input drive z;
- ``D`` (B, 4n): the part of dL/d[y, a, b, b0] that does not pass through ``M``;
- ``GU`` (B, 4n): dL/d[r, y, a, q] through ``M`` (``dO @ M^T``); ``GO`` (B, 4n): dL/dO.

Under ``TRITON_INTERPRET=1`` the kernels run on the CPU, which the tests use.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["BLOCK", "forward_step", "backward_step"]

BLOCK = 256
"""Elements of the (batch, n) grid handled by one program."""


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _elements(total, N: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (row, neuron) elements: flat indices, mask, neuron ``j``, offsets into X (6n), O (4n), U (2n)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = offs // N
    j = offs % N
    return offs, offs < total, j, i * (6 * N) + j, i * (4 * N) + j, i * (2 * N) + j


@triton.jit
def _step(x_ptr, o_ptr, z_ptr, u_ptr, dt_ptr, sigma_ptr, offs, mask, x_off, o_off, u_off, j, N: tl.constexpr):
    """The step's operands for each (row, neuron) and the drifts of the Euler update.

    ``f_y = -y + b z + (1 - sqrt(a+)) W_r r(y)``, ``f_a = -a + (sigma b0)^2 + W q``; also the
    sigmoids ``s_b, s_b0`` of the gain drives, ``sqrt(a+)`` and the step sizes.
    """
    y = tl.load(x_ptr + x_off + N, mask=mask)
    a = tl.load(x_ptr + x_off + 2 * N, mask=mask)
    b = tl.load(x_ptr + x_off + 4 * N, mask=mask)
    b0 = tl.load(x_ptr + x_off + 5 * N, mask=mask)
    p = tl.load(o_ptr + o_off, mask=mask)
    s_b = _sigmoid(tl.load(o_ptr + o_off + N, mask=mask) + tl.load(u_ptr + u_off, mask=mask))
    s_b0 = _sigmoid(tl.load(o_ptr + o_off + 2 * N, mask=mask) + tl.load(u_ptr + u_off + N, mask=mask))
    qw = tl.load(o_ptr + o_off + 3 * N, mask=mask)
    z = tl.load(z_ptr + offs, mask=mask)
    dt_y = tl.load(dt_ptr + j, mask=mask)
    dt_a = tl.load(dt_ptr + N + j, mask=mask)
    dt_b = tl.load(dt_ptr + 2 * N + j, mask=mask)
    dt_b0 = tl.load(dt_ptr + 3 * N + j, mask=mask)
    sigma = tl.load(sigma_ptr + j, mask=mask)
    sq = tl.sqrt(tl.maximum(a, 0.0))
    f_y = (1.0 - sq) * p + b * z - y
    sb0 = sigma * b0
    f_a = sb0 * sb0 + qw - a
    return y, a, b, b0, p, s_b, s_b0, z, dt_y, dt_a, dt_b, dt_b0, sigma, sq, f_y, f_a


@triton.jit
def forward_step(
    x_ptr,
    x_next_ptr,
    o_ptr,
    z_ptr,
    u_ptr,
    dt_ptr,
    sigma_ptr,
    total,
    N: tl.constexpr,
    RECTIFIED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``X_next = X + dt f(X)`` for every (row, neuron), then ``r`` and ``q`` of the new state."""
    offs, mask, j, x_off, o_off, u_off = _elements(total, N, BLOCK)
    y, a, b, b0, p, s_b, s_b0, z, dt_y, dt_a, dt_b, dt_b0, sigma, sq, f_y, f_a = _step(
        x_ptr, o_ptr, z_ptr, u_ptr, dt_ptr, sigma_ptr, offs, mask, x_off, o_off, u_off, j, N
    )
    y_new = y + dt_y * f_y
    a_new = a + dt_a * f_a
    if RECTIFIED:
        r_new = tl.maximum(y_new, 0.0)
    else:
        r_new = y_new
    tl.store(x_next_ptr + x_off, r_new, mask=mask)
    tl.store(x_next_ptr + x_off + N, y_new, mask=mask)
    tl.store(x_next_ptr + x_off + 2 * N, a_new, mask=mask)
    tl.store(x_next_ptr + x_off + 3 * N, tl.maximum(a_new, 0.0) * r_new * r_new, mask=mask)
    tl.store(x_next_ptr + x_off + 4 * N, b + dt_b * (s_b - b), mask=mask)
    tl.store(x_next_ptr + x_off + 5 * N, b0 + dt_b0 * (s_b0 - b0), mask=mask)


@triton.jit
def backward_step(
    x_ptr,
    x_next_ptr,
    o_ptr,
    z_ptr,
    u_ptr,
    d_next_ptr,
    gu_ptr,
    gy_ptr,
    ga_ptr,
    d_ptr,
    go_ptr,
    gz_ptr,
    acc_dt_ptr,
    acc_sigma_ptr,
    dt_ptr,
    sigma_ptr,
    total,
    N: tl.constexpr,
    RECTIFIED: tl.constexpr,
    HAS_GU: tl.constexpr,
    GRAD_Y: tl.constexpr,
    GRAD_A: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Backpropagate through one step: from dL/d(state after) to ``GO``, ``D`` (before) and the accumulators."""
    offs, mask, j, x_off, o_off, u_off = _elements(total, N, BLOCK)

    # dL/d[y, a, b, b0] after the step: direct part, recurrent part through M, trajectory outputs
    g_y = tl.load(d_next_ptr + o_off, mask=mask)
    g_a = tl.load(d_next_ptr + o_off + N, mask=mask)
    g_b = tl.load(d_next_ptr + o_off + 2 * N, mask=mask)
    g_b0 = tl.load(d_next_ptr + o_off + 3 * N, mask=mask)
    if HAS_GU:
        r1 = tl.load(x_next_ptr + x_off, mask=mask)
        y1 = tl.load(x_next_ptr + x_off + N, mask=mask)
        a1 = tl.load(x_next_ptr + x_off + 2 * N, mask=mask)
        g_q = tl.load(gu_ptr + o_off + 3 * N, mask=mask)
        g_r = tl.load(gu_ptr + o_off, mask=mask) + 2.0 * g_q * tl.maximum(a1, 0.0) * r1
        if RECTIFIED:
            g_r = tl.where(y1 >= 0.0, g_r, 0.0)
        g_y += tl.load(gu_ptr + o_off + N, mask=mask) + g_r
        g_a += tl.load(gu_ptr + o_off + 2 * N, mask=mask) + tl.where(a1 >= 0.0, g_q * r1 * r1, 0.0)
    if GRAD_Y:
        g_y += tl.load(gy_ptr + offs, mask=mask)
    if GRAD_A:
        g_a += tl.load(ga_ptr + offs, mask=mask)

    # recompute the step
    y, a, b, b0, p, s_b, s_b0, z, dt_y, dt_a, dt_b, dt_b0, sigma, sq, f_y, f_a = _step(
        x_ptr, o_ptr, z_ptr, u_ptr, dt_ptr, sigma_ptr, offs, mask, x_off, o_off, u_off, j, N
    )

    # gradients of the step sizes and of sigma, accumulated per (row, neuron)
    tl.store(acc_dt_ptr + o_off, tl.load(acc_dt_ptr + o_off, mask=mask) + g_y * f_y, mask=mask)
    tl.store(acc_dt_ptr + o_off + N, tl.load(acc_dt_ptr + o_off + N, mask=mask) + g_a * f_a, mask=mask)
    tl.store(acc_dt_ptr + o_off + 2 * N, tl.load(acc_dt_ptr + o_off + 2 * N, mask=mask) + g_b * (s_b - b), mask=mask)
    tl.store(acc_dt_ptr + o_off + 3 * N, tl.load(acc_dt_ptr + o_off + 3 * N, mask=mask) + g_b0 * (s_b0 - b0), mask=mask)
    e_y = g_y * dt_y
    e_a = g_a * dt_a
    e_b = g_b * dt_b
    e_b0 = g_b0 * dt_b0
    tl.store(acc_sigma_ptr + offs, tl.load(acc_sigma_ptr + offs, mask=mask) + e_a * b0 * b0, mask=mask)

    # dL/dO and dL/dz
    tl.store(go_ptr + o_off, e_y * (1.0 - sq), mask=mask)
    tl.store(go_ptr + o_off + N, e_b * s_b * (1.0 - s_b), mask=mask)
    tl.store(go_ptr + o_off + 2 * N, e_b0 * s_b0 * (1.0 - s_b0), mask=mask)
    tl.store(go_ptr + o_off + 3 * N, e_a, mask=mask)
    tl.store(gz_ptr + offs, e_y * b, mask=mask)

    # direct part of dL/d[y, a, b, b0] before the step
    tl.store(d_ptr + o_off, g_y * (1.0 - dt_y), mask=mask)
    g_sqrt = tl.where(a > 0.0, -e_y * p / (2.0 * tl.where(a > 0.0, sq, 1.0)), 0.0)
    tl.store(d_ptr + o_off + N, g_a * (1.0 - dt_a) + g_sqrt, mask=mask)
    tl.store(d_ptr + o_off + 2 * N, g_b * (1.0 - dt_b) + e_y * z, mask=mask)
    tl.store(d_ptr + o_off + 3 * N, g_b0 * (1.0 - dt_b0) + 2.0 * sigma * sigma * e_a * b0, mask=mask)
