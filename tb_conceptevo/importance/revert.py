"""The revert evaluation (ConceptEvo Sec. 4.4): revert binned neurons' activations
to epoch t inside the epoch-t' model and measure the class accuracy change."""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..recording import model_device_dtype
from .results import ImportanceResult, LayerImportance, RevertResult
from ._models import (
    _ForwardComplete, _as_logits, _capture_hooks, _check_all_ran, _evaluation_state, _forward_hooks,
    _layer_names, _unit_axis, check_same_architecture
)
from .sources import ImageSource, _ClassBatches, _check_class_index, _progress
from .sensitivity import concept_evolution_importance


def _bin_labels(n_bins: int) -> List[str]:
    edges = [round(100 * i / n_bins, 1) for i in range(n_bins + 1)]
    fmt = lambda v: f"{v:g}"  # noqa: E731 - tiny local formatter
    return [f"{fmt(a)}-{fmt(b)}%" for a, b in zip(edges[:-1], edges[1:])]


def revert_evaluation(
    model_from: nn.Module,
    model_to: nn.Module,
    images: ImageSource,
    class_index: int,
    importance: Union[None, ImportanceResult, Mapping[str, np.ndarray]] = None,
    layers: Union[None, str, Sequence[str]] = None,
    n_bins: int = 4,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    batch_size: int = 64,
    progress: bool = True,
    *,
    labels=None,
    max_images: Optional[int] = None,
    seed: int = 0,
    class_name: Optional[str] = None,
    from_step: Optional[int] = None,
    to_step: Optional[int] = None,
) -> RevertResult:
    """Revert evaluation of Sec. 4.4 for one class.

    Per layer: rank neurons by importance (most important first), split into ``n_bins``
    equal bins; for each bin, run ``model_to`` with those channels' outputs replaced by
    ``model_from``'s outputs for the same images and measure the class top-1 accuracy
    change against the unreverted ``model_to``.  For each seed, a random set of neurons
    of the size of the first bin is reverted the same way (the baseline).  Results are
    averaged across layers by :attr:`RevertResult.mean_change`.

    ``importance`` is an :class:`ImportanceResult` (or ``{layer: importance [C]}``);
    ``None`` computes it on the same images.  Flagged (NaN) neurons are kept out of
    the bins.  ``model_from`` runs once per batch; ``model_to`` runs
    ``1 + layers x (n_bins + len(seeds))`` times per batch.

    Example: the package docstring (:mod:`tb_conceptevo.importance`) runs both verbs on two
    snapshots of a small CNN.
    """
    class_index = _check_class_index(class_index)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    seeds = [int(s) for s in seeds]
    if importance is None:
        importance = concept_evolution_importance(
            model_from, model_to, images, class_index, layers, batch_size, progress,
            labels=labels, max_images=max_images, seed=seed, class_name=class_name,
            from_step=from_step, to_step=to_step,
        )
    scores = _importance_scores(importance, class_index)
    layer_names = _revert_layers(model_from, model_to, layers, scores)
    masks, bin_sizes, random_sizes = _revert_masks(layer_names, scores, n_bins, seeds)
    batches = _ClassBatches(images, class_index, labels, batch_size, max_images, seed)
    counts = _revert_counts(model_from, model_to, batches, class_index, layer_names, masks,
                            n_bins + len(seeds), progress)

    if isinstance(importance, ImportanceResult):  # the result's labels unless given
        class_name = class_name or importance.class_name
        from_step = importance.from_step if from_step is None else from_step
        to_step = importance.to_step if to_step is None else to_step
    return counts.result(class_index, layer_names, n_bins, seeds, bin_sizes, random_sizes,
                         class_name or batches.class_name, from_step, to_step)


def _importance_scores(importance: Union[ImportanceResult, Mapping[str, np.ndarray]],
                       class_index: int) -> Dict[str, LayerImportance]:
    """``{layer: LayerImportance}`` from a result of this class or plain arrays
    (non-finite values flagged)."""
    if isinstance(importance, ImportanceResult):
        if importance.class_index != class_index:
            raise ValueError(
                f"importance was computed for class {importance.class_index}, not {class_index}"
            )
        return {name: li for name, li in importance.layers.items()}
    if isinstance(importance, Mapping):
        scores = {}
        for name, values in importance.items():
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            flagged = ~np.isfinite(values)
            scores[name] = LayerImportance(name, values, np.where(flagged, np.nan, 0.0),
                                           np.zeros(len(values), np.int64), flagged,
                                           flagged.astype(np.int64))
        return scores
    raise TypeError(f"importance must be an ImportanceResult or a mapping, got {type(importance).__name__}")


def _revert_layers(model_from: nn.Module, model_to: nn.Module, layers, scores: Mapping) -> List[str]:
    """The layers to revert (default: every layer ``scores`` covers), checked in both models."""
    if layers is None:
        layer_names = list(scores)
        _layer_names(model_from, layer_names)
    else:
        layer_names = _layer_names(model_from, layers)
    missing = [name for name in layer_names if name not in scores]
    if missing:
        raise ValueError(f"importance has no values for layer(s) {missing}; it covers {list(scores)}")
    check_same_architecture(model_from, model_to, layer_names)
    return layer_names


def _revert_masks(layer_names: Sequence[str], scores: Mapping[str, LayerImportance], n_bins: int,
                  seeds: Sequence[int]) -> Tuple[Dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """Channel masks ``[configs, C]`` per layer: ``n_bins`` importance bins (most
    important first), then one random bin of the first bin's size per seed; and the
    sizes of the bins ``[layers, n_bins]`` and of the random bins ``[layers]``."""
    masks: Dict[str, torch.Tensor] = {}
    bin_sizes = np.zeros((len(layer_names), n_bins), np.int64)
    random_sizes = np.zeros(len(layer_names), np.int64)
    for li, name in enumerate(layer_names):
        score = scores[name]
        order = score.ranking()
        if len(order) < n_bins:
            raise ValueError(
                f"layer {name!r} has {len(order)} neurons with a finite importance, fewer than "
                f"n_bins={n_bins}; choose fewer bins or other layers"
            )
        n = score.n_neurons
        config = np.zeros((n_bins + len(seeds), n), bool)
        for b, members in enumerate(np.array_split(order, n_bins)):
            config[b, members] = True
            bin_sizes[li, b] = len(members)
        size = int(bin_sizes[li, 0])
        random_sizes[li] = size
        for r, s in enumerate(seeds):
            rng = np.random.default_rng([s, li])
            config[n_bins + r, rng.choice(order, size=size, replace=False)] = True
        masks[name] = torch.from_numpy(config)
    return masks, bin_sizes, random_sizes


class _RevertCounts(NamedTuple):
    """Class hits and summed class logits of ``model_to``: unreverted (``base_*``) and
    per (layer, mask configuration)."""

    correct: torch.Tensor      # int64 [layers, configs]
    logit_sum: torch.Tensor    # float64 [layers, configs]
    base_correct: torch.Tensor
    base_logit: torch.Tensor
    n_images: int

    def result(self, class_index: int, layer_names: Sequence[str], n_bins: int, seeds: List[int],
               bin_sizes: np.ndarray, random_sizes: np.ndarray, class_name: Optional[str],
               from_step: Optional[int], to_step: Optional[int]) -> RevertResult:
        """Accuracy and mean class-logit changes against the unreverted model, split
        into the importance bins and the random ones."""
        base_accuracy = self.base_correct.cpu().numpy() / self.n_images
        accuracy_change = self.correct.cpu().numpy() / self.n_images - base_accuracy
        logit_change = (self.logit_sum.cpu().numpy() - self.base_logit.cpu().numpy()) / self.n_images
        return RevertResult(
            class_index=class_index,
            n_images=self.n_images,
            layers=list(layer_names),
            bin_labels=_bin_labels(n_bins),
            seeds=seeds,
            baseline_accuracy=float(base_accuracy),
            bin_accuracy_change=accuracy_change[:, :n_bins],
            random_accuracy_change=accuracy_change[:, n_bins:],
            bin_logit_change=logit_change[:, :n_bins],
            random_logit_change=logit_change[:, n_bins:],
            bin_sizes=bin_sizes,
            random_sizes=random_sizes,
            class_name=class_name,
            from_step=from_step,
            to_step=to_step,
        )


def _revert_counts(model_from: nn.Module, model_to: nn.Module, batches: _ClassBatches, class_index: int,
                   layer_names: Sequence[str], masks: Dict[str, torch.Tensor], n_configs: int,
                   progress: bool) -> _RevertCounts:
    """Run ``model_to`` on every batch unreverted and once per layer and mask
    configuration with the masked channels replaced by ``model_from``'s outputs for
    the same images."""
    device_to, dtype_to = model_device_dtype(model_to)
    device_from, dtype_from = model_device_dtype(model_from)
    correct = torch.zeros(len(layer_names), n_configs, dtype=torch.int64, device=device_to)
    logit_sum = torch.zeros(len(layer_names), n_configs, dtype=torch.float64, device=device_to)
    base_correct = torch.zeros((), dtype=torch.int64, device=device_to)
    base_logit = torch.zeros((), dtype=torch.float64, device=device_to)
    n_images = 0

    def score_batch(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return ((logits.argmax(1) == class_index).sum(),
                logits[:, class_index].sum(dtype=torch.float64))

    with _evaluation_state(model_from), _evaluation_state(model_to), torch.no_grad():
        masks = {name: m.to(device_to) for name, m in masks.items()}
        for batch in _progress(batches, progress, f"revert class {class_index}", len(batches)):
            n_images += batch.shape[0]
            z_from: Dict[str, torch.Tensor] = {}
            make = _capture_hooks(z_from, stop_when_complete=len(layer_names))
            try:
                x_from = batch.to(device_from, dtype_from)
                with _forward_hooks(model_from, {name: make(name) for name in layer_names}, x_from[:1]):
                    _as_logits(model_from(x_from), class_index)
            except _ForwardComplete:
                pass
            _check_all_ran(layer_names, z_from, "model_from")
            x_to = batch.to(device_to, dtype_to)
            c, s = score_batch(_as_logits(model_to(x_to), class_index))
            base_correct += c
            base_logit += s
            for li, name in enumerate(layer_names):
                state = {"mask": None}
                substitute = _substitution(model_to, name, z_from[name].to(device_to, dtype_to), x_to, state)
                with _forward_hooks(model_to, {name: substitute}, x_to[:1]):
                    for k in range(n_configs):
                        state["mask"] = masks[name][k]
                        c, s = score_batch(_as_logits(model_to(x_to), class_index))
                        correct[li, k] += c
                        logit_sum[li, k] += s
    if n_images == 0:
        raise ValueError(f"no images of class {class_index} were given")
    return _RevertCounts(correct, logit_sum, base_correct, base_logit, n_images)


def _substitution(model_to: nn.Module, name: str, stored: torch.Tensor, x_to: torch.Tensor, state: Dict):
    """Forward hook on layer ``name`` of ``model_to``: the channels in ``state["mask"]``
    take the stored ``model_from`` output."""

    def substitute(module, inputs, output):
        if output.shape != stored.shape:
            raise ValueError(
                f"snapshots differ at layer {name!r}: its output has shape "
                f"{list(stored.shape)} in model_from but {list(output.shape)} in model_to"
            )
        if _unit_axis(model_to, name, module, output, x_to) == 1:
            shape = (1, -1) + (1,) * (output.dim() - 2)
        else:  # channels last: tokens [B, T, C] or [B, H, W, C]
            shape = (1,) * (output.dim() - 1) + (-1,)
        return torch.where(state["mask"].view(shape), stored, output)

    return substitute
