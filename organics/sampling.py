"""Random admissible circuits: the samplers the chapters and the tests draw from.

Each sampler takes a :class:`numpy.random.Generator` and returns a :class:`SampledCircuit`
(a :class:`~organics.circuit.Circuit` and an input drive ``z``), so a seeded generator gives
the same circuits wherever they are drawn. Distributions (``U`` uniform, ``LU`` log-uniform):

- :func:`sample_circuit`: parameters spread over many decades (time constants, gains,
  normalization weights, drives), the stress test of the stability claims (chapters 2, 3, 5);
- :func:`sample_moderate_circuit`: the moderate parameters of the paper's Fig. 4 (``U`` ranges
  within one decade, ``z >= 0`` with ``||z|| < 1``) and a Gaussian ``W_r`` of given largest
  singular value (chapter 5, Algorithm 1);
- :func:`sample_planar_circuit`: a 2D circuit (one y, one a) for a given ``w_r``, parameters
  over decades (chapter 4);
- :func:`random_recurrence`: a Gaussian ``W_r`` rescaled to a given largest singular value;
- :func:`sample_circuit_small_drive`: the parameters of :func:`sample_circuit` with the drive of
  the paper's Fig. 4 (``z >= 0``, ``||z|| < 1``), the control of chapter 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ._checks import check_count, check_positive
from .circuit import Circuit
from .planar import planar_circuit

__all__ = [
    "SampledCircuit",
    "random_recurrence",
    "sample_circuit",
    "sample_moderate_circuit",
    "sample_planar_circuit",
    "sample_circuit_small_drive",
]


@dataclass(frozen=True)
class SampledCircuit:
    """A random circuit and its input drive ``z`` (shape (n,), or a float for a 2D circuit)."""

    circuit: Circuit
    z: NDArray | float


def _log_uniform(rng: np.random.Generator, low: float, high: float, size: int | None = None) -> NDArray | float:
    return 10 ** rng.uniform(np.log10(low), np.log10(high), size)


def random_recurrence(rng: np.random.Generator, n: int, norm: float) -> NDArray:
    """``W_r = norm * G / ||G||_2`` with ``G`` an n x n standard Gaussian matrix.

    Raises
    ------
    ValueError
        If ``norm`` is not finite and > 0, or ``n`` not an integer >= 1.
    """
    check_positive("norm", norm)
    check_count("n", n)
    W_r = rng.standard_normal((n, n))
    return W_r * (norm / np.linalg.norm(W_r, 2))


def sample_circuit(
    rng: np.random.Generator,
    n: int | None = None,
    *,
    n_max: int = 30,
    rectified: bool = False,
    recurrent_norm: float | None = None,
) -> SampledCircuit:
    """Draw an admissible circuit and input drive with parameters spread over many decades.

    Distributions ("per neuron or shared" is a coin flip):

    - ``n``: LU integer in ``[1, n_max]`` unless given;
    - ``tau_y ~ LU[0.1, 10]`` ms, ``tau_a = tau_y * LU[1e-3, 1e3]`` (per neuron or shared);
    - ``b ~ U(0, 1]``, ``b0 ~ LU[1e-2, 10]``, ``sigma ~ LU[1e-3, 10]`` (per neuron or shared);
    - ``W = scale * U[0, 1]`` entrywise, ``scale ~ LU[1e-2, 1e2] / n``, dense or with a random
      sparsity mask (density ``U[0, 1]``, so rows of zeros occur);
    - ``z = LU[1e-2, 1e2] * N(0, I)``, made nonnegative with probability 1/2;
    - ``W_r = I`` if ``recurrent_norm`` is None, else :func:`random_recurrence`.

    Parameters
    ----------
    rng : numpy.random.Generator
    n : int, optional
        Dimension (number of y neurons); drawn if omitted.
    n_max : int
        Largest dimension drawn when ``n`` is omitted.
    rectified : bool
        Main (False) or rectified (True) model.
    recurrent_norm : float, optional
        Largest singular value of a random ``W_r``; ``W_r = I`` if omitted.
    """
    if n is None:
        check_count("n_max", n_max)
        n = int(np.floor(_log_uniform(rng, 1, n_max + 1)))
    check_count("n", n)
    check_positive("recurrent_norm", recurrent_norm, optional=True)

    def maybe_per_neuron() -> int | None:
        return n if rng.random() < 0.5 else None

    tau_y = _log_uniform(rng, 0.1, 10, maybe_per_neuron())
    tau_a = tau_y * _log_uniform(rng, 1e-3, 1e3, maybe_per_neuron())
    b = 1 - rng.uniform(0, 1, maybe_per_neuron())
    b0 = _log_uniform(rng, 1e-2, 10, maybe_per_neuron())
    sigma = _log_uniform(rng, 1e-3, 10, maybe_per_neuron())
    W = _log_uniform(rng, 1e-2, 1e2) / n * rng.uniform(0, 1, (n, n))
    if rng.random() < 0.5:
        W = W * (rng.uniform(0, 1, (n, n)) < rng.uniform(0, 1))
    z = _log_uniform(rng, 1e-2, 1e2) * rng.standard_normal(n)
    if rng.random() < 0.5:
        z = np.abs(z)
    W_r = None if recurrent_norm is None else random_recurrence(rng, n, recurrent_norm)
    circuit = Circuit(W, b=b, b0=b0, sigma=sigma, tau_y=tau_y, tau_a=tau_a, W_r=W_r, rectified=rectified)
    return SampledCircuit(circuit, z)


def sample_moderate_circuit(rng: np.random.Generator, n: int, recurrent_norm: float) -> SampledCircuit:
    """Draw a main-model circuit in the regime of the paper's Fig. 4.

    ``W_r`` from :func:`random_recurrence` (largest singular value ``recurrent_norm``),
    ``W ~ U[0, 1]`` entrywise, ``b ~ U(0, 1]``, ``b0, sigma ~ U[0.1, 1]``,
    ``tau_y, tau_a ~ U[1, 10]`` ms (per neuron), and ``z = c u / ||u||`` with ``u ~ U[0, 1]^n``
    and ``c ~ U[0, 1]``, so ``z >= 0`` and ``||z|| < 1``.
    """
    check_count("n", n)
    W_r = random_recurrence(rng, n, recurrent_norm)
    circuit = Circuit(
        rng.uniform(0, 1, (n, n)),
        b=1 - rng.uniform(0, 1, n),
        b0=rng.uniform(0.1, 1, n),
        sigma=rng.uniform(0.1, 1, n),
        tau_y=rng.uniform(1, 10, n),
        tau_a=rng.uniform(1, 10, n),
        W_r=W_r,
    )
    z = rng.uniform(0, 1, n)
    return SampledCircuit(circuit, z * rng.uniform(0, 1) / np.linalg.norm(z))


def sample_planar_circuit(rng: np.random.Generator, w_r: float) -> SampledCircuit:
    """Draw a 2D circuit (:func:`organics.planar.planar_circuit`) for a given ``w_r`` and its scalar input.

    ``tau_y ~ LU[0.1, 10]``, ``w ~ LU[1e-3, 1e2]``, ``b ~ U(0, 1]``, ``b0 ~ LU[1e-2, 10]``,
    ``sigma ~ LU[1e-3, 10]``, ``tau_a = tau_y LU[1e-3, 1e3]``, main or rectified model (coin
    flip); ``z = 0`` with probability 0.1, else ``+-LU[1e-2, 1e2]``.
    """
    tau_y = 10 ** rng.uniform(-1, 1)
    params = dict(
        w=10 ** rng.uniform(-3, 2),
        b=1 - rng.uniform(0, 1),
        b0=10 ** rng.uniform(-2, 1),
        sigma=10 ** rng.uniform(-3, 1),
        tau_y=tau_y,
        tau_a=tau_y * 10 ** rng.uniform(-3, 3),
        rectified=bool(rng.integers(2)),
    )
    z = 0.0 if rng.random() < 0.1 else rng.choice([-1.0, 1.0]) * 10 ** rng.uniform(-2, 2)
    return SampledCircuit(planar_circuit(w_r, **params), float(z))


def sample_circuit_small_drive(
    rng: np.random.Generator,
    n: int | None = None,
    *,
    n_max: int = 30,
    recurrent_norm: float | None = None,
) -> SampledCircuit:
    """A main-model circuit of :func:`sample_circuit` with the drive of :func:`sample_moderate_circuit`.

    Draws a circuit with :func:`sample_circuit` (parameters over many decades), then replaces its
    drive by ``z = c u / ||u||`` with ``u ~ U(0, 1]^n`` and ``c ~ U[0, 1)``, so ``z >= 0`` and
    ``||z|| < 1``, the paper's condition on the input. The other parameters have the
    distributions of :func:`sample_circuit` (same arguments, main model).
    """
    sample = sample_circuit(rng, n, n_max=n_max, recurrent_norm=recurrent_norm)
    u = 1 - rng.uniform(0, 1, sample.circuit.n)  # in (0, 1]: never all zero
    return SampledCircuit(sample.circuit, u * rng.uniform(0, 1) / np.linalg.norm(u))
