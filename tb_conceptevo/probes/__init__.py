"""Probe sets: fixed, ordered, content-hashed image sets.

* :class:`ConceptShapes` -- the embedded procedural default with ground-truth
  concepts and pixel masks (shape, colour, texture, position, size).
* :class:`DatasetProbe` -- any ``torch.utils.data.Dataset`` of images.
* :class:`ImageFolderProbe` -- a folder of image files.
* :func:`content_hash` -- the stable SHA-256 every probe set reports as ``.hash``.
"""

from .adapters import DatasetProbe, ImageFolderProbe
from .base import ConceptVocabulary, ProbeSet
from .concept_shapes import ConceptShapes
from .hashing import content_hash

__all__ = [
    "ProbeSet",
    "ConceptVocabulary",
    "ConceptShapes",
    "DatasetProbe",
    "ImageFolderProbe",
    "content_hash",
]
