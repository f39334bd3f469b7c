"""Concept-Monitor metrics: anchor distance and interpretable-neuron counts.

* :func:`d_anchor` -- Eq. 2 of Concept-Monitor: the mean, over anchors, of the
  distance from the anchor to its closest neuron.  Lower = the neurons cover the
  anchors better (more diverse concepts).
* :func:`interpretable_counts` / :func:`interpretable_fraction` -- neurons whose best
  concept similarity exceeds the detector's tau and the neuron's chance level
  (:meth:`Detection.interpretable`), per concept category (data of the
  bar charts of the paper's Fig. 2) and as a fraction of all neurons.

Example:
    >>> import numpy as np
    >>> neurons = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    >>> anchors = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    >>> d_anchor(neurons, anchors)        # (1 + 0) / 2
    0.5
"""

from __future__ import annotations

from typing import Dict

import numpy as np


def d_anchor(neuron_vectors, anchor_vectors) -> float:
    """Anchor distance ``mean_i min_j ||u_j - f(a_i)||_2`` (Concept-Monitor Eq. 2).

    Args:
        neuron_vectors: ``[N, d]`` neuron embeddings; rows with NaN (unplaced neurons)
            are ignored.
        anchor_vectors: ``[A, d]`` anchor embeddings (all finite).

    Returns:
        The distance as a float; NaN when no neuron is placed.
    """
    neurons = np.asarray(neuron_vectors, dtype=np.float64)
    anchors = np.asarray(anchor_vectors, dtype=np.float64)
    if neurons.ndim != 2 or anchors.ndim != 2:
        raise ValueError(f"d_anchor needs 2-D arrays, got shapes {neurons.shape} and {anchors.shape}")
    if anchors.shape[0] == 0:
        raise ValueError("d_anchor needs at least one anchor vector")
    if neurons.shape[1] != anchors.shape[1]:
        raise ValueError(
            f"neuron vectors have {neurons.shape[1]} dimensions but anchors {anchors.shape[1]}; "
            "embed both with the same text encoder"
        )
    if not np.isfinite(anchors).all():
        raise ValueError("anchor vectors contain NaN/Inf")
    neurons = neurons[np.isfinite(neurons).all(axis=1)]
    if neurons.shape[0] == 0:
        return float("nan")
    # ||a - u||^2 = |a|^2 + |u|^2 - 2 a.u for all pairs at once, in blocks of anchors
    neuron_sq = (neurons * neurons).sum(axis=1)
    closest = np.empty(anchors.shape[0])
    block = max(1, (1 << 24) // max(1, neurons.shape[0]))
    for start in range(0, anchors.shape[0], block):
        part = anchors[start:start + block]
        squared = (part * part).sum(axis=1)[:, None] + neuron_sq[None, :] - 2.0 * part @ neurons.T
        closest[start:start + block] = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
    return float(closest.mean())


def interpretable_counts(detection) -> Dict[str, int]:
    """Interpretable neurons (best similarity > tau and > chance) per category of their best concept.

    Every category of the detection's vocabulary appears (0 when none), in order of
    first appearance in ``detection.categories``.
    """
    categories = list(dict.fromkeys(detection.categories))
    index, _ = detection.top()
    interpretable = detection.interpretable() & (index >= 0)
    if not len(categories):
        return {}
    category_of_concept = np.array([categories.index(c) for c in detection.categories], dtype=np.int64)
    counts = np.bincount(category_of_concept[index[interpretable]], minlength=len(categories))
    return {category: int(count) for category, count in zip(categories, counts)}


def interpretable_fraction(detection) -> float:
    """Fraction of the layer's neurons that are interpretable (0 for an empty layer)."""
    n = detection.similarity.shape[0]
    if n == 0:
        return 0.0
    return float(detection.interpretable().sum()) / n
