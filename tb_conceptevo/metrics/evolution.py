"""ConceptEvo's map-level metrics: differential entropy of a 2-D layout and the
evolution speed of neuron embeddings between two logged steps.

Both ignore unplaced neurons (NaN rows) and return plain floats, ready to be logged
as ordinary TensorBoard scalars (``metadata.scalar_tag("entropy", space, layer)``).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> round(differential_entropy(rng.normal(size=(5000, 2))), 1)  # N(0, 1): 0.5 ln(2 pi e) = 1.42
1.4
>>> evolution_speed(np.zeros((3, 2)), np.ones((3, 2)))          # every neuron moved sqrt(2)
1.4142135623730951
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..spaces.layout import as_matrix as _matrix


def differential_entropy(layout, min_points: int = 4) -> float:
    """Differential entropy of a 2-D map, estimated per dimension and averaged.

    Estimator (one, used everywhere): Vasicek's m-spacing estimator per coordinate,

        H = mean_i log( n / (2 m) * (x_(i+m) - x_(i-m)) ),

    with the sorted sample clamped at its ends and the window ``m = round(sqrt(n))``
    (the usual choice; consistent for n -> infinity).  Zero spacings (coincident
    points) are floored at 1e-12 times the coordinate's range, so ties lower the value
    instead of producing -inf.  It is in nats, shift-invariant and adds ``log c`` when
    the map is scaled by ``c``: a uniform spread over a width w gives ``log w``, a
    Gaussian of standard deviation s gives ``1.42 + log s`` (the paper's values, 1.1 to
    2.1, correspond to maps a few units wide).

    Args:
        layout: ``[N, D]`` positions (normally D = 2); rows with NaN/Inf are ignored.
        min_points: below this many finite rows the estimate is meaningless: NaN.

    Returns:
        The mean over dimensions of the per-dimension entropies (float; NaN when too
        few points).
    """
    points = _matrix(layout, "layout", np.float64)
    points = points[np.isfinite(points).all(axis=1)]
    n = points.shape[0]
    if n < max(2, min_points):
        return float("nan")
    m = max(1, int(round(np.sqrt(n))))
    ordered = np.sort(points, axis=0)                                   # [n, D]
    index = np.arange(n)
    upper = ordered[np.minimum(index + m, n - 1)]
    lower = ordered[np.maximum(index - m, 0)]
    spread = ordered[-1] - ordered[0]
    floor = 1e-12 * np.where(spread > 0, spread, 1.0)
    spacing = np.maximum(upper - lower, floor)
    per_dimension = np.log(n / (2.0 * m) * spacing).mean(axis=0)
    return float(per_dimension.mean())


def evolution_speed(
    prev_vectors,
    vectors,
    placed_prev: Optional[np.ndarray] = None,
    placed: Optional[np.ndarray] = None,
) -> float:
    """Mean Euclidean movement of neuron embeddings between two steps.

    Only neurons placed at both steps (given masks, and finite rows) count; the two
    arrays must describe the same neurons in the same order.

    Args:
        prev_vectors, vectors: ``[N, d]`` embeddings at the previous and current step.
        placed_prev, placed: optional bool ``[N]`` masks (e.g. ``Embedding.placed``).

    Returns:
        The mean distance (float), NaN when no neuron is placed at both steps.
    """
    before = _matrix(prev_vectors, "prev_vectors", np.float64)
    after = _matrix(vectors, "vectors", np.float64)
    if before.shape != after.shape:
        raise ValueError(
            f"prev_vectors {before.shape} and vectors {after.shape} must have the same shape "
            "(the same neurons of the same layer in the same space)"
        )
    both = np.isfinite(before).all(axis=1) & np.isfinite(after).all(axis=1)
    for name, mask in (("placed_prev", placed_prev), ("placed", placed)):
        if mask is not None:
            mask = np.asarray(mask, dtype=bool).reshape(-1)
            if mask.shape[0] != before.shape[0]:
                raise ValueError(f"{name} has {mask.shape[0]} entries for {before.shape[0]} neurons")
            both &= mask
    if not both.any():
        return float("nan")
    return float(np.linalg.norm(after[both] - before[both], axis=1).mean())
