"""ConceptEvo Eq. 7-9: the sensitivity of a class logit to each neuron's concept
evolution, and its importance (one backward pass per batch for every channel)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..recording import model_device_dtype
from .results import ImportanceResult, LayerImportance
from ._models import (
    _ForwardComplete, _as_logits, _capture_hooks, _check_all_ran, _check_first_call, _check_output,
    _evaluation_state, _forward_hooks, _layer_names, _unit_axis, check_same_architecture,
)
from .sources import ImageSource, _ClassBatches, _check_class_index, _progress


def _batch_sensitivity(model_from: nn.Module, model_to: nn.Module, images: torch.Tensor,
                       class_index: int, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``S_n(x)`` ``[B, C]`` for every layer; models must already be in evaluation state."""
    device_to, dtype_to = model_device_dtype(model_to)
    device_from, dtype_from = model_device_dtype(model_from)

    # Z^t' of every layer (no graph needed).  The pass stops once every layer is
    # captured: the rest of model_to (e.g. VGG's large classifier) is not needed.
    z_to: Dict[str, torch.Tensor] = {}
    make = _capture_hooks(z_to, stop_when_complete=len(layers))
    try:
        x_to = images.to(device_to, dtype_to)
        with torch.no_grad(), _forward_hooks(model_to, {name: make(name) for name in layers}, x_to[:1]):
            _as_logits(model_to(x_to), class_index)
    except _ForwardComplete:
        pass
    _check_all_ran(layers, z_to, "model_to")

    # Z^t with a graph to the class logit.  The hooked tensor must stay untouched and in
    # the graph: the hook returns a clone so in-place modules after the layer modify the
    # clone, not Z^t.  The first hooked layer's output does not require grad (parameters
    # are frozen), so it becomes a leaf; later ones are reached through it.
    z_from: Dict[str, torch.Tensor] = {}
    axes: Dict[str, int] = {}

    def make_graph_hook(name: str):
        def hook(module, inputs, output):
            _check_first_call(name, z_from)
            z = _check_output(name, output)
            axes[name] = _unit_axis(model_from, name, module, z, images)
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            z_from[name] = z
            return z.clone()

        return hook

    x_from = images.to(device_from, dtype_from)
    with torch.enable_grad(), _forward_hooks(model_from, {n: make_graph_hook(n) for n in layers}, x_from[:1]):
        logits = _as_logits(model_from(x_from), class_index)
        _check_all_ran(layers, z_from, "model_from")
        # Images are independent in eval mode: d(sum_b logit_b)/dZ_b = d logit_b / dZ_b.
        grads = torch.autograd.grad(
            logits[:, class_index].sum(), [z_from[name] for name in layers], allow_unused=True
        )

    sensitivity: Dict[str, torch.Tensor] = {}
    for name, grad in zip(layers, grads):
        z_t = z_from[name].detach()
        z_t2 = z_to[name].to(z_t.device, z_t.dtype)
        if z_t2.shape != z_t.shape:
            raise ValueError(
                f"snapshots differ at layer {name!r}: its output has shape {list(z_t.shape)} in "
                f"model_from but {list(z_t2.shape)} in model_to"
            )
        if grad is None:  # the layer does not reach the logits: no sensitivity
            grad = torch.zeros_like(z_t)
        # Eq. 8 for all channels at once: dZ_n is zero outside channel n (every
        # position or token of it, class tokens included).
        product = (grad * (z_t2 - z_t)).movedim(axes[name], 1)
        sensitivity[name] = product.flatten(2).sum(-1) if product.dim() > 2 else product
    return sensitivity


def evolution_sensitivity(model_from: nn.Module, model_to: nn.Module, images: torch.Tensor,
                          class_index: int, layers: Union[None, str, Sequence[str]] = None
                          ) -> Dict[str, torch.Tensor]:
    """Per-image sensitivities ``S_n(x)`` (Eq. 8) for one batch: ``{layer: [B, C]}``.

    All images are treated as class ``class_index`` images.  Memory is O(batch
    activations), so pass a modest batch; :func:`concept_evolution_importance` batches
    for you and aggregates.

    >>> import torch
    >>> def small_cnn():
    ...     return torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    ...                                torch.nn.Flatten(), torch.nn.Linear(64, 4))
    >>> s = evolution_sensitivity(small_cnn(), small_cnn(), torch.rand(16, 3, 12, 12), class_index=0)
    >>> s["0"].shape
    torch.Size([16, 64])
    """
    class_index = _check_class_index(class_index)
    layer_names = _layer_names(model_from, layers)
    check_same_architecture(model_from, model_to, layer_names)
    with _evaluation_state(model_from), _evaluation_state(model_to):
        return _batch_sensitivity(model_from, model_to, torch.as_tensor(images), class_index, layer_names)


def concept_evolution_importance(
    model_from: nn.Module,
    model_to: nn.Module,
    images: ImageSource,
    class_index: int,
    layers: Union[None, str, Sequence[str]] = None,
    batch_size: int = 64,
    progress: bool = True,
    *,
    labels=None,
    max_images: Optional[int] = None,
    seed: int = 0,
    class_name: Optional[str] = None,
    from_step: Optional[int] = None,
    to_step: Optional[int] = None,
) -> ImportanceResult:
    """Importance (Eq. 9) of every neuron's concept evolution from ``model_from`` (epoch t)
    to ``model_to`` (epoch t') for class ``class_index``.

    Args:
        model_from, model_to: two snapshots of the same architecture.  Both run in eval
            mode (restored afterwards); inputs go to each model's device.
        images: the class's images: a tensor ``[B, 3, H, W]`` (all used, or filtered by
            ``labels``), a Dataset/ProbeSet (filtered by its labels) or a DataLoader of
            ``(images, labels)`` (filtered batch by batch).
        class_index: the class ``c`` whose logit is differentiated.
        layers: module names; default every ``nn.Conv2d``.  Any module whose output is
            ``[B, C, ...]`` works (a neuron = a channel of dim 1).
        max_images, seed: use a deterministic random sample of at most ``max_images``
            class images (the paper uses 128).
        class_name, from_step, to_step: carried into the result (and the event payloads).

    Returns:
        :class:`ImportanceResult` with per layer ``importance``, ``mean_sensitivity``,
        ``positive_count`` and ``flagged`` (non-finite) arrays.

    Example: the package docstring (:mod:`tb_conceptevo.importance`) runs both verbs on two
    snapshots of a small CNN.
    """
    class_index = _check_class_index(class_index)
    layer_names = _layer_names(model_from, layers)
    check_same_architecture(model_from, model_to, layer_names)
    batches = _ClassBatches(images, class_index, labels, batch_size, max_images, seed)
    if class_name is None:
        class_name = batches.class_name

    with _evaluation_state(model_from), _evaluation_state(model_to):
        totals, n_images = _sensitivity_totals(model_from, model_to, batches, class_index, layer_names, progress)
    if n_images == 0:
        raise ValueError(f"no images of class {class_index} were given")
    per_layer = {name: _layer_importance(name, *totals[name], n_images) for name in layer_names}
    return ImportanceResult(class_index, n_images, per_layer, class_name, from_step, to_step)


def _sensitivity_totals(model_from: nn.Module, model_to: nn.Module, batches: _ClassBatches, class_index: int,
                        layer_names: Sequence[str], progress: bool
                        ) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """Per layer, over all batches: how many images have ``S_n > 0``, the sum of the
    finite ``S_n`` and how many are not finite (``[C]`` each, on the model's device);
    and the number of images.  Models must already be in evaluation state."""
    positive: Dict[str, torch.Tensor] = {}
    finite_sum: Dict[str, torch.Tensor] = {}
    nonfinite: Dict[str, torch.Tensor] = {}
    n_images = 0
    for batch in _progress(batches, progress, f"importance class {class_index}", len(batches)):
        sensitivity = _batch_sensitivity(model_from, model_to, batch, class_index, layer_names)
        n_images += batch.shape[0]
        for name, s in sensitivity.items():
            finite = torch.isfinite(s)
            # Accumulate on the model's device; one transfer at the end.
            pos = ((s > 0) & finite).sum(0)
            total = torch.where(finite, s, torch.zeros_like(s)).sum(0, dtype=torch.float64)
            bad = (~finite).sum(0)
            if name in positive:
                positive[name] += pos
                finite_sum[name] += total
                nonfinite[name] += bad
            else:
                positive[name], finite_sum[name], nonfinite[name] = pos, total, bad
    return {name: (positive[name], finite_sum[name], nonfinite[name]) for name in positive}, n_images


def _layer_importance(name: str, positive: torch.Tensor, finite_sum: torch.Tensor, nonfinite: torch.Tensor,
                      n_images: int) -> LayerImportance:
    """Eq. 9 (the fraction of images with ``S_n > 0``) and the mean sensitivity of one
    layer; NaN for the neurons with a non-finite sensitivity."""
    pos = positive.cpu().numpy().astype(np.int64)
    bad = nonfinite.cpu().numpy().astype(np.int64)
    flagged = bad > 0
    importance = (pos / n_images).astype(np.float32)
    mean = (finite_sum.cpu().numpy() / n_images).astype(np.float32)
    importance[flagged] = np.nan
    mean[flagged] = np.nan
    return LayerImportance(name, importance, mean, pos, flagged, bad)
