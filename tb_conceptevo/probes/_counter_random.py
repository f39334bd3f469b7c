"""The counter-based generator behind ConceptShapes: every parameter of image ``i`` is
a SplitMix64 hash of ``(seed, parameter stream, i)``, so any subset of images, in any
order, is reproducible and drawn vectorised over images."""

from __future__ import annotations

from typing import Optional

import numpy as np

# Parameter streams of the counter-based generator: one independent draw per image
# and stream.  Never renumber (that would change every image); append new ones.
_STREAM_SHAPE, _STREAM_COLOUR, _STREAM_TEXTURE = 0, 1, 2
_STREAM_RADIUS, _STREAM_CX, _STREAM_CY, _STREAM_ROTATION = 3, 4, 5, 6
_STREAM_GREY, _STREAM_TINT_R, _STREAM_TINT_G, _STREAM_TINT_B = 7, 8, 9, 10
_STREAM_CONTRAST, _STREAM_PERIOD, _STREAM_ANGLE = 11, 12, 13
_STREAM_PHASE_X, _STREAM_PHASE_Y, _STREAM_BRIGHTNESS = 14, 15, 16
_STREAM_NOISY_LABEL, _STREAM_NOISE_CLASS, _STREAM_PIXEL_NOISE = 17, 18, 19


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrap-around arithmetic is intended)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, stream: int, index: np.ndarray, extra: Optional[np.ndarray] = None):
    """Uniform float64 in ``[0, 1)`` depending only on ``(seed, stream, index[, extra])``."""
    key = _splitmix64(_splitmix64(np.array([seed], np.uint64)) ^ np.array([stream], np.uint64))
    bits = _splitmix64(np.asarray(index, np.uint64) ^ key)
    if extra is not None:
        bits = _splitmix64(bits ^ _splitmix64(np.asarray(extra, np.uint64)))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
