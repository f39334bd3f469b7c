"""Result types of the importance computation and the revert evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass
class LayerImportance:
    """Importance of every neuron (channel) of one layer for one class.

    Attributes:
        layer: module name (``"features.3"``).
        importance: float32 ``[C]``; Eq. 9, fraction of the class images with ``S_n > 0``.
            NaN for flagged neurons.
        mean_sensitivity: float32 ``[C]``; mean of ``S_n(x)`` over the class images
            (NaN for flagged neurons).
        positive_count: int64 ``[C]``; number of images with ``S_n > 0``.
        flagged: bool ``[C]``; True where ``S_n(x)`` was NaN/Inf for some image (non-finite
            gradient or activation).  Such neurons are kept out of the importance and of
            the revert bins; the other neurons are unaffected.
        nonfinite_count: int64 ``[C]``; images with a non-finite ``S_n``.
    """

    layer: str
    importance: np.ndarray
    mean_sensitivity: np.ndarray
    positive_count: np.ndarray
    flagged: np.ndarray
    nonfinite_count: np.ndarray

    @property
    def n_neurons(self) -> int:
        return int(self.importance.shape[0])

    def ranking(self) -> np.ndarray:
        """Neuron indices of the unflagged neurons, most important first (ties broken by
        the higher mean sensitivity, then by the lower index)."""
        valid = np.flatnonzero(~self.flagged)
        order = np.lexsort((valid, -self.mean_sensitivity[valid], -self.importance[valid]))
        return valid[order]


@dataclass
class ImportanceResult:
    """Output of :func:`concept_evolution_importance` (one class, two snapshots)."""

    class_index: int
    n_images: int
    layers: Dict[str, LayerImportance]
    class_name: Optional[str] = None
    from_step: Optional[int] = None
    to_step: Optional[int] = None

    def __getitem__(self, layer: str) -> LayerImportance:
        return self.layers[layer]

    @property
    def layer_names(self) -> List[str]:
        return list(self.layers)

    def top(self, k: int = 10) -> List[Tuple[str, int, float]]:
        """The ``k`` most important neurons over all layers as ``(layer, channel, I_n)``."""
        rows = [
            (name, int(c), float(li.importance[c]), float(li.mean_sensitivity[c]))
            for name, li in self.layers.items()
            for c in li.ranking()[:k]
        ]
        rows.sort(key=lambda r: (-r[2], -r[3]))
        return [r[:3] for r in rows[:k]]



@dataclass
class RevertResult:
    """Output of :func:`revert_evaluation`.

    Changes are ``accuracy(reverted) - accuracy(not reverted)`` on the class images at
    epoch t' (negative = the reverted evolutions mattered), as fractions in [-1, 1].

    Attributes:
        layers: evaluated layers (rows of the arrays).
        bin_labels: ``["0-25%", "25-50%", ...]``, most important bin first.
        seeds: one random bin per seed and layer.
        baseline_accuracy: top-1 class accuracy of the epoch-t' model, nothing reverted.
        bin_accuracy_change: float ``[L, n_bins]``.
        random_accuracy_change: float ``[L, n_seeds]``.
        bin_logit_change / random_logit_change: the same for the mean class-``c`` logit
            (a smoother signal than accuracy on small image sets).
        bin_sizes: int ``[L, n_bins]`` neurons per bin; random_sizes: int ``[L]``.
    """

    class_index: int
    n_images: int
    layers: List[str]
    bin_labels: List[str]
    seeds: List[int]
    baseline_accuracy: float
    bin_accuracy_change: np.ndarray
    random_accuracy_change: np.ndarray
    bin_logit_change: np.ndarray
    random_logit_change: np.ndarray
    bin_sizes: np.ndarray
    random_sizes: np.ndarray
    class_name: Optional[str] = None
    from_step: Optional[int] = None
    to_step: Optional[int] = None

    @property
    def mean_change(self) -> np.ndarray:
        """``[n_bins]`` accuracy change per bin, averaged over layers (paper Step 5)."""
        return self.bin_accuracy_change.mean(axis=0)

    @property
    def std_change(self) -> np.ndarray:
        """``[n_bins]`` standard deviation of the per-layer changes."""
        return self.bin_accuracy_change.std(axis=0)

    @property
    def random_mean(self) -> float:
        """Random-bin accuracy change averaged over layers and seeds."""
        return float(self.random_accuracy_change.mean())

    @property
    def random_std(self) -> float:
        """Standard deviation over seeds of the layer-averaged random-bin change."""
        return float(self.random_accuracy_change.mean(axis=0).std())

    def table(self) -> str:
        """Human-readable table (bins x mean/std, then the random baseline)."""
        lines = [f"class {self.class_index}: baseline accuracy {self.baseline_accuracy:.3f} "
                 f"({self.n_images} images, {len(self.layers)} layers)",
                 f"{'bin':>10}  {'mean change':>12}  {'std':>8}"]
        for label, mean, std in zip(self.bin_labels, self.mean_change, self.std_change):
            lines.append(f"{label:>10}  {mean:>+12.4f}  {std:>8.4f}")
        lines.append(f"{'random':>10}  {self.random_mean:>+12.4f}  {self.random_std:>8.4f}")
        return "\n".join(lines)

