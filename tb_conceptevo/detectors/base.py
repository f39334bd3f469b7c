"""What every concept detector provides: a ``[neurons, concepts]`` similarity matrix.

Detectors are fed by the same forward pass that records stimuli: the writer asks each
detector for a :class:`~tb_conceptevo.recording.RecordingConsumer` and hands it every
batch's activation maps.  A detector that truly needs more than one pass (e.g. the
per-neuron activation quantiles of Network Dissection) says so with ``passes``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np


@dataclass
class Detection:
    """Concept similarities of one layer's neurons.

    Attributes:
        layer: module name.
        similarity: float32 ``[N, C]``, higher = more similar (scale is detector-specific:
            IoU for NetDissect, soft-WPMI score or cos^3 for CLIP-Dissect).
        concepts: the C concept words.
        categories: the category of each concept (e.g. "colour", "shape", "texture").
        threshold: tau; a neuron is *interpretable* when its top similarity exceeds it.
    """

    layer: str
    similarity: np.ndarray
    concepts: List[str]
    categories: List[str]
    threshold: float

    def top(self):
        """``(index [N] int32, similarity [N] float32)`` of each neuron's best concept;
        index -1 where the row is all NaN."""
        sim = np.where(np.isfinite(self.similarity), self.similarity, -np.inf)
        idx = sim.argmax(axis=1).astype(np.int32)
        best = sim[np.arange(sim.shape[0]), idx].astype(np.float32)
        idx[~np.isfinite(best)] = -1
        best[~np.isfinite(best)] = np.nan
        return idx, best

    def interpretable(self) -> np.ndarray:
        _, best = self.top()
        return np.nan_to_num(best, nan=-np.inf) > self.threshold


class Detector(abc.ABC):
    """Base class of concept detectors.

    Subclasses set ``name`` (used in tags), ``concepts``, ``categories`` and
    ``threshold``, and implement :meth:`consumer`.
    """

    name: str = "detector"
    concepts: List[str]
    categories: List[str]
    threshold: float = 0.0
    #: softmax temperature a TextSpace uses with this detector's similarities by default
    default_temperature: float = 0.1

    @abc.abstractmethod
    def consumer(self, probe, layers: Sequence[str]):
        """A fresh :class:`~tb_conceptevo.recording.RecordingConsumer` whose
        ``result()`` is ``Dict[layer, Detection]``."""
