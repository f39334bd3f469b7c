"""Scalar metrics of concept maps (logged as ordinary TensorBoard scalars).

* :func:`differential_entropy`, :func:`evolution_speed` - ConceptEvo.
* :func:`d_anchor`, :func:`interpretable_counts`, :func:`interpretable_fraction` - Concept-Monitor.
"""

from .anchors import d_anchor, interpretable_counts, interpretable_fraction
from .evolution import differential_entropy, evolution_speed

__all__ = ["d_anchor", "differential_entropy", "evolution_speed", "interpretable_counts", "interpretable_fraction"]
