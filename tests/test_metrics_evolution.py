"""Differential entropy of a layout and evolution speed."""

import numpy as np
import pytest

from tb_conceptevo.metrics import differential_entropy, evolution_speed


def test_entropy_matches_closed_forms():
    rng = np.random.default_rng(0)
    # uniform over width w: log w; Gaussian with sd s: 0.5 log(2 pi e) + log s
    assert differential_entropy(rng.uniform(0, 4, (4000, 2))) == pytest.approx(np.log(4), abs=0.05)
    assert differential_entropy(rng.normal(0, 2, (4000, 2))) == pytest.approx(1.4189 + np.log(2), abs=0.05)
    # per dimension, averaged
    mixed = np.stack([rng.uniform(0, 1, 4000), rng.uniform(0, np.e ** 2, 4000)], 1)
    assert differential_entropy(mixed) == pytest.approx(1.0, abs=0.05)


def test_entropy_invariances_and_nan_rows():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(500, 2))
    base = differential_entropy(points)
    assert differential_entropy(points + 7.0) == pytest.approx(base, abs=1e-9)
    assert differential_entropy(points * 3.0) == pytest.approx(base + np.log(3.0), abs=1e-9)
    with_nan = np.concatenate([points, np.full((20, 2), np.nan)])
    assert differential_entropy(with_nan) == pytest.approx(base, abs=1e-12)
    # a concentrated map has lower entropy than a spread one; ties never give -inf
    assert differential_entropy(points * 0.1) < base
    assert np.isfinite(differential_entropy(np.zeros((50, 2))))
    assert np.isnan(differential_entropy(np.full((10, 2), np.nan)))
    assert np.isnan(differential_entropy(points[:2]))
    with pytest.raises(ValueError, match="2-D"):
        differential_entropy(np.zeros(5))


def test_evolution_speed():
    before = np.zeros((4, 3))
    after = np.array([[3.0, 4, 0], [0, 0, 1], [np.nan, 0, 0], [10, 0, 0]])
    # row 2 unplaced now (NaN), row 3 excluded by the mask
    assert evolution_speed(before, after, placed=np.array([1, 1, 1, 0], bool)) == pytest.approx(3.0)
    assert evolution_speed(before, after, placed_prev=np.zeros(4, bool)) != evolution_speed(before, after)
    assert np.isnan(evolution_speed(before, after, placed_prev=np.zeros(4, bool)))
    with pytest.raises(ValueError, match="same shape"):
        evolution_speed(before, after[:2])
    with pytest.raises(ValueError, match="entries"):
        evolution_speed(before, after, placed=np.ones(3, bool))
