"""Importance of neurons' concept evolutions for a class (ConceptEvo Eq. 7-9, Sec. 3.3)
and the revert evaluation of Sec. 4.4.

Definitions (paper notation; ``Z^t`` = activation map of a layer at epoch ``t``):

* Eq. 7: ``dZ_n = [0, ..., Z^t'_n - Z^t_n, ..., 0]`` -- the change of channel ``n`` only.
* Eq. 8: ``S_n(x) = grad h^t_c(Z^t(x)) . dZ_n(x)`` -- the directional derivative of the
  class-``c`` logit of the **epoch-t model** (``h^t``: the part of the t model after the
  layer), taken **at the epoch-t activation** ``Z^t``, in the direction of neuron ``n``'s
  evolution.  So the gradient comes from ``model_from`` and the perturbed activation is
  ``model_from``'s; ``model_to`` only supplies ``Z^t'``.
* Eq. 9: ``I_n = |{x in X_c : S_n(x) > 0}| / |X_c|``.

Because ``dZ_n`` is zero outside channel ``n``, ``S_n = sum_{h,w} grad[n,h,w] *
(Z^t'[n,h,w] - Z^t[n,h,w])``: one backward pass per batch yields ``S`` for every channel
of every chosen layer.  Images of a batch are independent (the models run in eval mode),
so the gradient of the *sum* of the class logits over the batch is each image's own
gradient.

The revert evaluation (Sec. 4.4) ranks a layer's neurons by importance, splits them into
quartile bins (most important first), replaces the binned channels' activations in the
epoch-t' model by the epoch-t ones, and measures the class accuracy change; a random bin
of the same size (one per seed) is the baseline.

Example:

    >>> import torch
    >>> from tb_conceptevo.probes import ConceptShapes
    >>> def small_cnn():  # two "snapshots" of one architecture (untrained here)
    ...     return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    ...                                torch.nn.Flatten(), torch.nn.Linear(8, 6))
    >>> model_epoch3, model_epoch9 = small_cnn(), small_cnn()
    >>> probe = ConceptShapes(n=64, size=16)        # labels: the shape (class 2 = triangle)
    >>> result = concept_evolution_importance(model_epoch3, model_epoch9, probe, class_index=2, progress=False)
    >>> result["0"].importance.shape              # per channel of layer "0": fraction of images with S_n > 0
    (8,)
    >>> table = revert_evaluation(model_epoch3, model_epoch9, probe, 2, result, progress=False)
    >>> table.mean_change.shape, table.bin_labels  # accuracy change per bin (random baseline: random_mean)
    ((4,), ['0-25%', '25-50%', '50-75%', '75-100%'])
    >>> print(table.table())                       # doctest: +ELLIPSIS
    class 2: baseline accuracy ... (12 images, 1 layers)
           bin   mean change       std
         0-25%  ...
"""

from .results import ImportanceResult, LayerImportance, RevertResult
from ._models import check_same_architecture
from .sources import class_images, class_indices
from .sensitivity import concept_evolution_importance, evolution_sensitivity
from .revert import revert_evaluation

__all__ = [
    "LayerImportance",
    "ImportanceResult",
    "RevertResult",
    "concept_evolution_importance",
    "evolution_sensitivity",
    "revert_evaluation",
    "class_indices",
    "class_images",
    "check_same_architecture",
]
