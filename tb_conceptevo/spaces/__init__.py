"""Semantic spaces: place every neuron of any model at any step in one frame.

* :class:`ConceptEvoSpace` - ConceptEvo's unified semantic space, fitted once from a
  base model's observations (co-activation skip-gram + image embeddings).
* :class:`TextSpace` - Concept-Monitor's text-anchored space: a neuron is the
  softmax-weighted mean of its concepts' text embeddings; needs no fitting.
* :func:`load_space` - read any space file written by ``space.save(path)``.
"""

from .base import Anchors, Embedding, Space
from .conceptevo import ConceptEvoSpace
from .layout import StableLayout
from .text import TextSpace

__all__ = ["Anchors", "ConceptEvoSpace", "Embedding", "Space", "StableLayout", "TextSpace", "load_space"]


def load_space(path, **kwargs) -> Space:
    """Load a space file of any kind (``kwargs`` go to the kind's ``load``)."""
    from .io import read_header

    kind = read_header(path).get("kind")
    classes = {"conceptevo": ConceptEvoSpace, "text": TextSpace}
    if kind not in classes:
        raise ValueError(f"space file {str(path)!r} holds a space of unknown kind {kind!r}; known: {sorted(classes)}")
    return classes[kind].load(path, **kwargs)
