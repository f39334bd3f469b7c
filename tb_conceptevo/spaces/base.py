"""What every semantic space provides: ``embed`` a layer's observation into ``[N, d]``
vectors plus a *stable* 2-D layout fitted once.

Spaces are produced by ``fit`` (ConceptEvo) or by construction (text-anchored) and are
then frozen: the same observation always gives the same vectors and layout, so the
same concept lands at the same place in every step and every run.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..observation import LayerObservation


@dataclass
class Embedding:
    """A layer placed in a space.

    Attributes:
        vectors: float32 ``[N, d]``; rows of unplaced neurons are NaN.
        layout: float32 ``[N, 2]``; rows of unplaced neurons are NaN (never the origin).
        placed: bool ``[N]``; False where the space could not place the neuron
            (no covered stimulus, invalid activations, ...).
        groups: optional int32 ``[N]`` concept group per neuron (-1 = none).
    """

    vectors: np.ndarray
    layout: np.ndarray
    placed: np.ndarray
    groups: Optional[np.ndarray] = None

    @property
    def n_unplaced(self) -> int:
        return int((~self.placed).sum())


@dataclass
class Anchors:
    """Labelled reference points of a space (drawn as stars on the map)."""

    words: List[str]
    vectors: np.ndarray   # float32 [A, d]
    layout: np.ndarray    # float32 [A, 2]
    kind: List[str]       # per point: "anchor" or "concept"


class Space(abc.ABC):
    """Base class of semantic spaces.

    Subclasses set ``name`` (used in tag names, see ``tb_conceptevo._names.check_name``) and
    implement :meth:`embed`, :meth:`save` and :meth:`load`.  A space that needs a
    concept detector's similarities (the text-anchored space) exposes it as
    ``detector``; the writer then runs that detector during the recording pass and
    passes its :class:`~tb_conceptevo.detectors.base.Detection` to :meth:`embed`.
    """

    name: str = "space"
    #: detector whose output ``embed`` needs, or None
    detector = None
    #: content hash of the probe set the space is bound to ("" = any)
    probe_hash: str = ""

    @abc.abstractmethod
    def embed(self, observation: LayerObservation, detection=None) -> Embedding:
        """Place every neuron of ``observation``; must be deterministic."""

    def anchors(self) -> Optional[Anchors]:
        """Labelled reference points, or None."""
        return None

    @abc.abstractmethod
    def save(self, path) -> None:
        """Write the fitted space to one versioned file."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path) -> "Space":
        """Read a file written by :meth:`save`; clear error on other versions/corruption."""

    def check_probe(self, probe_hash: str) -> None:
        if self.probe_hash and probe_hash and probe_hash != self.probe_hash:
            raise ValueError(
                f"space {self.name!r} was built for probe set {self.probe_hash[:12]}... but the "
                f"observations come from probe set {probe_hash[:12]}...; record with the same "
                "probe set (same images, same order) or fit a new space"
            )
