"""The metrics of one snapshot's placement in a space, per layer and for the whole model.

One function serves the writer (live and back-filled snapshots) and anything that
re-derives the logged scalars from embeddings (the demo's robustness check), so both
compute exactly the same numbers.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .anchors import d_anchor
from .evolution import differential_entropy, evolution_speed

#: ``(vectors [N, d], placed bool [N])`` of the previous snapshot
Previous = Tuple[np.ndarray, np.ndarray]


def embedding_metrics(vectors: np.ndarray, layout: np.ndarray, placed: np.ndarray,
                      previous: Optional[Previous] = None,
                      anchor_vectors: Optional[np.ndarray] = None) -> Dict[str, float]:
    """``{"entropy": ..., "speed": ..., "d_anchor": ...}`` of one placement.

    ``speed`` only with a ``previous`` placement of the same neurons, ``d_anchor`` only
    with at least one anchor vector."""
    placed = np.asarray(placed, dtype=bool)
    metrics = {"entropy": differential_entropy(layout[placed])}
    if previous is not None and previous[0].shape == vectors.shape:
        metrics["speed"] = evolution_speed(previous[0], vectors, previous[1], placed)
    if anchor_vectors is not None and len(anchor_vectors):
        metrics["d_anchor"] = d_anchor(vectors[placed], anchor_vectors)
    return metrics


def whole_model(embeddings: Sequence) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(vectors, layout, placed)`` of every layer's embedding, concatenated in order
    (the whole-model ``all`` series)."""
    return (np.concatenate([e.vectors for e in embeddings]),
            np.concatenate([e.layout for e in embeddings]),
            np.concatenate([e.placed for e in embeddings]))


def anchor_vectors(anchors) -> Optional[np.ndarray]:
    """The vectors of a space's anchors (its rows of kind ``"anchor"``), None without anchors."""
    if anchors is None:
        return None
    return anchors.vectors[[kind == "anchor" for kind in anchors.kind]]
