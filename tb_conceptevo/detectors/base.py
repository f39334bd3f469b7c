"""What every concept detector provides: a ``[neurons, concepts]`` similarity matrix.

Detectors are fed by the same forward pass that records stimuli: the writer asks each
detector for a :class:`~tb_conceptevo.recording.RecordingConsumer` and hands it every
batch's activation maps.  A detector that truly needs more than one pass (e.g. the
per-neuron activation quantiles of Network Dissection) says so with ``passes``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

#: chance level = this upper quantile of the null's top scores (about 0.5-1 % of the
#: neurons of a detector with no real relation to the concepts pass; measured 0.9 %
#: for NetDissect on noise maps, 0 % for CLIP-Dissect with random weights)
NULL_QUANTILE = 0.995
#: null top scores wanted per layer (pooled over its neurons) to estimate that quantile
NULL_SAMPLES = 2000


@dataclass
class Detection:
    """Concept similarities of one layer's neurons.

    Attributes:
        layer: module name.
        similarity: float32 ``[N, C]``, higher = more similar (scale is detector-specific:
            IoU for NetDissect, soft-WPMI score or cos^3 for CLIP-Dissect).
        concepts: the C concept words.
        categories: the category of each concept (e.g. "colour", "shape", "texture").
        threshold: tau; a neuron is *interpretable* when its top similarity exceeds it
            and its chance level.
        null_similarity: float32 ``[N]`` chance level of each neuron's top similarity:
            the score its best concept would reach by chance (see :class:`ChanceLevel`);
            None when the detector computed no null (then only tau counts).
    """

    layer: str
    similarity: np.ndarray
    concepts: List[str]
    categories: List[str]
    threshold: float
    null_similarity: Optional[np.ndarray] = None

    def ranked(self, count: int):
        """``(index [N, m] int32, similarity [N, m] float32)`` of each neuron's ``m =
        min(count, C)`` best concepts, best first (ties: lower concept index); index -1
        and NaN where a row has fewer finite similarities."""
        sim = np.where(np.isfinite(self.similarity), self.similarity, -np.inf).astype(np.float32)
        count = min(count, sim.shape[1])
        order = np.argsort(-sim, axis=1, kind="stable")[:, :count].astype(np.int32)
        best = np.take_along_axis(sim, order, axis=1)
        order[~np.isfinite(best)] = -1
        best[~np.isfinite(best)] = np.nan
        return order, best

    def top(self):
        """``(index [N] int32, similarity [N] float32)`` of each neuron's best concept;
        index -1 where the row is all NaN."""
        order, best = self.ranked(1)
        return order[:, 0], best[:, 0]

    def interpretable(self) -> np.ndarray:
        """bool ``[N]``: the top similarity exceeds tau and the neuron's chance level."""
        _, best = self.top()
        best = np.nan_to_num(best, nan=-np.inf)
        passed = best > self.threshold
        if self.null_similarity is not None:
            passed &= best > np.nan_to_num(np.asarray(self.null_similarity, np.float32), nan=np.inf)
        return passed


def null_draws(n_neurons: int, minimum: int = 2, maximum: int = 16) -> int:
    """Null draws that give about :data:`NULL_SAMPLES` pooled top scores for a layer."""
    return int(min(maximum, max(minimum, -(-NULL_SAMPLES // max(1, n_neurons)))))


class ChanceLevel:
    """Chance level of each neuron's top score, from draws of a null similarity matrix.

    A null draw is the detector's own similarity ``[N, C]`` recomputed with the link
    between neurons and concepts broken (NetDissect: concept masks of other images;
    CLIP-Dissect: randomly rotated text features).  Per neuron, its null scores give a
    mean ``mu_n`` and spread ``sd_n`` over draws and concepts; each draw's top null
    score becomes ``z = (max_c null[n, c] - mu_n) / sd_n``, with ``mu_n, sd_n`` of the
    *other* draws (as the real top score is standardised by draws it is not part of;
    including the draw itself shrinks its z and lets too many neurons pass).  The z of
    all neurons and draws are pooled (one draw gives only one top score per neuron, the
    layer gives many) and their :data:`NULL_QUANTILE` quantile ``z*`` sets the chance
    level ``mu_n + z* sd_n`` in the neuron's own units.  A detector unrelated to the
    concepts therefore marks about 0.5-1 % of the neurons interpretable, whatever its
    score scale.

    Memory O(N x draws): per draw only per-neuron sums and the top score are kept.
    """

    def __init__(self):
        self._sums: List[np.ndarray] = []      # per draw: [3, N] count, sum, sum of squares
        self._tops: List[np.ndarray] = []      # per draw: [N] top score (-inf: none)

    def add(self, null_similarity) -> None:
        """Add one null draw ``[N, C]`` (NaN rows: neurons without a score)."""
        null = np.asarray(null_similarity, np.float64)
        finite = np.isfinite(null)
        values = np.where(finite, null, 0.0)
        self._sums.append(np.stack([finite.sum(axis=1), values.sum(axis=1), (values * values).sum(axis=1)]))
        self._tops.append(np.where(finite, null, -np.inf).max(axis=1, initial=-np.inf))

    @staticmethod
    def _moments(sums: np.ndarray):
        """(mean, spread) from ``[..., 3, N]`` sums; spread 0 where the scores are constant."""
        count = np.maximum(sums[..., 0, :], 1.0)
        mean = sums[..., 1, :] / count
        spread = np.sqrt(np.maximum(sums[..., 2, :] / count - mean * mean, 0.0))
        # a spread below float rounding of the mean is no spread
        spread = np.where(spread > 1e-9 * np.maximum(np.abs(mean), 1e-30), spread, 0.0)
        return mean, spread

    def levels(self, quantile: float = NULL_QUANTILE) -> np.ndarray:
        """float32 ``[N]`` chance levels (NaN for neurons without null scores)."""
        if not self._sums:
            raise ValueError("ChanceLevel.levels() needs at least one null draw (add())")
        per_draw = np.stack(self._sums)                                     # [draws, 3, N]
        total = per_draw.sum(axis=0)
        mean, spread = self._moments(total)
        others = total[None] - per_draw if len(per_draw) > 1 else per_draw  # leave each draw out
        other_mean, other_spread = self._moments(others)
        tops = np.stack(self._tops)                                         # [draws, N]
        usable = np.isfinite(tops) & (other_spread > 0)
        z = (tops - other_mean) / np.where(other_spread > 0, other_spread, 1.0)
        pooled = z[usable]
        z_star = float(np.quantile(pooled, quantile, method="higher")) if pooled.size else 0.0
        level = mean + z_star * spread
        level[total[0] == 0] = np.nan
        return level.astype(np.float32)


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
    #: why this detector's labels mean nothing (e.g. random weights), or None
    unlabelled_reason: Optional[str] = None

    @abc.abstractmethod
    def consumer(self, probe, layers: Sequence[str]):
        """A fresh :class:`~tb_conceptevo.recording.RecordingConsumer` whose
        ``result()`` is ``Dict[layer, Detection]``."""
