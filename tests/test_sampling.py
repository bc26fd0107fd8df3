"""Random circuits: reproducible, admissible, with the distributions their docstrings state."""

import numpy as np
import pytest

from organics.planar import fixed_points
from organics.sampling import (
    random_recurrence,
    sample_circuit,
    sample_circuit_small_drive,
    sample_moderate_circuit,
    sample_planar_circuit,
)


def test_sample_circuit_is_reproducible_and_has_requested_recurrent_norm():
    s1 = sample_circuit(np.random.default_rng(5), n=6, recurrent_norm=1.0)
    s2 = sample_circuit(np.random.default_rng(5), n=6, recurrent_norm=1.0)
    np.testing.assert_array_equal(s1.circuit.W, s2.circuit.W)
    np.testing.assert_array_equal(s1.z, s2.z)
    np.testing.assert_allclose(np.linalg.norm(s1.circuit.W_r, 2), 1.0)
    assert np.all(s1.circuit.W >= 0)


def test_moderate_circuits_are_in_the_regime_of_fig_4():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sample = sample_moderate_circuit(rng, 7, 0.8)
        c = sample.circuit
        np.testing.assert_allclose(np.linalg.norm(c.W_r, 2), 0.8)
        assert np.all(sample.z >= 0) and np.linalg.norm(sample.z) < 1
        assert np.all((c.b0 >= 0.1) & (c.b0 <= 1)) and np.all((c.tau_y >= 1) & (c.tau_y <= 10))
        assert not c.rectified


def test_small_drive_circuits_have_wide_parameters_and_the_drive_of_fig_4():
    for seed in range(20):
        sample = sample_circuit_small_drive(np.random.default_rng(seed), n_max=12, recurrent_norm=0.5)
        wide = sample_circuit(np.random.default_rng(seed), n_max=12, recurrent_norm=0.5)  # same draws up to z
        for name in ("W", "W_r", "b", "b0", "sigma", "tau_y", "tau_a"):
            np.testing.assert_array_equal(getattr(sample.circuit, name), getattr(wide.circuit, name))
        assert np.all(sample.z >= 0) and np.linalg.norm(sample.z) < 1 and not sample.circuit.rectified
    again = sample_circuit_small_drive(np.random.default_rng(19), n_max=12, recurrent_norm=0.5)
    np.testing.assert_array_equal(again.z, sample.z)


def test_planar_circuits_have_the_requested_w_r_and_a_stable_fixed_point():
    rng = np.random.default_rng(1)
    for _ in range(30):
        sample = sample_planar_circuit(rng, 2.5)
        assert sample.circuit.n == 1 and sample.circuit.W_r[0, 0] == 2.5 and isinstance(sample.z, float)
        assert any(p.stable for p in fixed_points(sample.circuit, sample.z))


def test_bad_arguments_raise_naming_the_parameter():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="recurrent_norm"):
        sample_circuit(rng, recurrent_norm=0.0)
    with pytest.raises(ValueError, match="recurrent_norm must be finite"):
        sample_circuit(rng, recurrent_norm=np.inf)
    with pytest.raises(ValueError, match="n must"):
        random_recurrence(rng, 0, 1.0)
    with pytest.raises(ValueError, match="norm"):
        random_recurrence(rng, 3, -1.0)
    with pytest.raises(ValueError, match="n must"):
        sample_moderate_circuit(rng, 0, 1.0)
    with pytest.raises(ValueError, match="n_max"):
        sample_circuit(rng, n_max=0)
    with pytest.raises(ValueError, match="n must be an integer"):
        random_recurrence(rng, 2.5, 1.0)
