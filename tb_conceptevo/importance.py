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
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import metadata
from .probes.base import ProbeSet
from .recording import (_base_name, _detect_layout, _token_model_options, model_device_dtype, point_hooks,
                        resolve_points)

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
    "importance_payload",
    "importance_payloads",
    "revert_payload",
]

ImageSource = Union[torch.Tensor, np.ndarray, torch.utils.data.Dataset, torch.utils.data.DataLoader]


# --------------------------------------------------------------------------- results


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

    def to_dict(self) -> Dict:
        return {
            "class_index": self.class_index,
            "class_name": self.class_name,
            "from_step": self.from_step,
            "to_step": self.to_step,
            "n_images": self.n_images,
            "layers": {
                name: {
                    "importance": li.importance,
                    "mean_sensitivity": li.mean_sensitivity,
                    "positive_count": li.positive_count,
                    "flagged": li.flagged,
                    "nonfinite_count": li.nonfinite_count,
                }
                for name, li in self.layers.items()
            },
        }


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

    def to_dict(self) -> Dict:
        return {
            "class_index": self.class_index,
            "class_name": self.class_name,
            "from_step": self.from_step,
            "to_step": self.to_step,
            "n_images": self.n_images,
            "layers": list(self.layers),
            "bin_labels": list(self.bin_labels),
            "seeds": list(self.seeds),
            "baseline_accuracy": self.baseline_accuracy,
            "bin_accuracy_change": self.bin_accuracy_change,
            "random_accuracy_change": self.random_accuracy_change,
            "bin_logit_change": self.bin_logit_change,
            "random_logit_change": self.random_logit_change,
            "bin_sizes": self.bin_sizes,
            "random_sizes": self.random_sizes,
            "mean_change": self.mean_change,
            "std_change": self.std_change,
            "random_mean": self.random_mean,
            "random_std": self.random_std,
        }


# --------------------------------------------------------------------------- layers and models


def _layer_names(model: nn.Module, layers=None) -> List[str]:
    """Module names to analyse, resolved exactly like the recorder does (default every
    ``nn.Conv2d``; names or submodules; unknown names -> error with close matches)."""
    from .recording import resolve_layers

    return [name for name, _ in resolve_layers(model, layers)]


def check_same_architecture(model_from: nn.Module, model_to: nn.Module, layers: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the first layer whose parameters/buffers or module type
    differ between the two snapshots."""
    if not isinstance(model_from, nn.Module) or not isinstance(model_to, nn.Module):
        raise TypeError(
            f"model_from and model_to must be torch.nn.Module, got "
            f"{type(model_from).__name__} and {type(model_to).__name__}"
        )
    state_from, state_to = model_from.state_dict(), model_to.state_dict()
    for key in state_from:
        if key not in state_to:
            raise ValueError(
                f"snapshots differ in architecture: layer {key.rpartition('.')[0] or key!r} has "
                f"{key!r} in model_from but not in model_to"
            )
        shape_from, shape_to = tuple(state_from[key].shape), tuple(state_to[key].shape)
        if shape_from != shape_to:
            raise ValueError(
                f"snapshots differ in architecture: layer {key.rpartition('.')[0]!r} has "
                f"{key.rpartition('.')[2]} of shape {list(shape_from)} in model_from but "
                f"{list(shape_to)} in model_to"
            )
    for key in state_to:
        if key not in state_from:
            raise ValueError(
                f"snapshots differ in architecture: layer {key.rpartition('.')[0] or key!r} has "
                f"{key!r} in model_to but not in model_from"
            )
    modules_to = dict(model_to.named_modules())
    modules_from = dict(model_from.named_modules())
    for name in layers:
        name = _base_name(name, modules_from)[0]  # "conv1.raw" -> "conv1"
        if name not in modules_to:
            raise ValueError(f"snapshots differ in architecture: layer {name!r} is missing in model_to")
        if type(modules_to[name]) is not type(modules_from[name]):
            raise ValueError(
                f"snapshots differ in architecture: layer {name!r} is a "
                f"{type(modules_from[name]).__name__} in model_from but a "
                f"{type(modules_to[name]).__name__} in model_to"
            )


@contextlib.contextmanager
def _evaluation_state(model: nn.Module):
    """Eval mode and frozen parameters inside the block; every module's training flag and
    every parameter's ``requires_grad`` restored afterwards, also on exceptions.

    Freezing the parameters means the backward pass computes activation gradients only.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in requires_grad:
            param.requires_grad_(False)
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for param, flag in requires_grad:
            param.requires_grad_(flag)


def _forward_hooks(model: nn.Module, hooks: Mapping[str, Callable], example: torch.Tensor):
    """Register ``{layer name: hook}`` at each layer's hook point, the same point the
    recorder reads (:func:`tb_conceptevo.recording.resolve_points`: a conv after its
    normalisation and activation), so importance and revert act on what the next layer
    sees.  ``example`` (one input) locates the points of models torch.fx cannot trace.
    Always removed when the block ends."""
    points = resolve_points(model, list(hooks), example)
    return point_hooks(model, points, lambda point: hooks[point.layer])


def _as_logits(output, class_index: int) -> torch.Tensor:
    """The ``[B, K]`` logits of a model output (tensor, tuple/list -> first, ``.logits``)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TypeError(f"the model must return class logits of shape [batch, classes], got {shape}")
    n_classes = output.shape[1]
    if not 0 <= class_index < n_classes:
        raise ValueError(
            f"class index {class_index} is out of range: the model has {n_classes} outputs "
            f"(valid: 0..{n_classes - 1})"
        )
    return output


def _check_output(name: str, output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise TypeError(
            f"layer {name!r} must output a tensor [batch, channels, ...] to be analysed, got "
            f"{type(output).__name__ if not isinstance(output, torch.Tensor) else list(output.shape)}"
        )
    return output


def _unit_axis(model: nn.Module, name: str, module: nn.Module, output: torch.Tensor, images: torch.Tensor) -> int:
    """The channel axis of a layer's output, as the recorder reads it (1 for
    ``[B, C, H, W]``, -1 for tokens ``[B, T, C]`` and Swin's ``[B, H, W, C]``)."""
    options = _token_model_options(model, None)
    return _detect_layout(name, module, output, tuple(images.shape[-2:]), options).channel_axis


def _check_all_ran(layers: Sequence[str], store: Mapping[str, torch.Tensor], model: str) -> None:
    missing = [name for name in layers if name not in store]
    if missing:
        raise ValueError(f"layer(s) {missing} did not run in the forward pass of {model}")


class _ForwardComplete(Exception):
    """Raised by a capture hook to end a forward pass whose remaining output is unused."""


def _capture_hooks(store: Dict[str, torch.Tensor], stop_when_complete: Optional[int] = None
                   ) -> Callable[[str], Callable]:
    """Forward hooks that keep a copy of each layer's output (a copy because in-place
    modules after the layer, e.g. ``ReLU(inplace=True)``, would overwrite it).  With
    ``stop_when_complete=n`` the hook raises :class:`_ForwardComplete` once ``n`` layers
    are stored."""

    def make(name: str):
        def hook(module, inputs, output):
            if name in store:
                raise ValueError(
                    f"layer {name!r} ran twice in one forward pass; importance needs each "
                    f"analysed module to run once per pass (pick another layer)"
                )
            store[name] = _check_output(name, output).detach().clone()
            if stop_when_complete is not None and len(store) == stop_when_complete:
                raise _ForwardComplete

        return hook

    return make


# --------------------------------------------------------------------------- images


def _dataset_labels(dataset: torch.utils.data.Dataset) -> np.ndarray:
    """Class labels of a dataset: ``.labels`` (ProbeSet), ``.targets`` (torchvision), or
    read item by item as the second element of ``dataset[i]``."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = []
        for i in range(len(dataset)):
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError(
                    f"{type(dataset).__name__}[i] must return (image, label) to select a class's images"
                )
            labels.append(int(item[1]))
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _class_name(source, class_index: int) -> Optional[str]:
    names = getattr(source, "class_names", None)
    if names is None:
        names = getattr(source, "classes", None)
    if names is not None and 0 <= class_index < len(names):
        return str(names[class_index])
    return None


def _no_images_error(class_index: int, labels: np.ndarray, source) -> ValueError:
    present = sorted(set(int(v) for v in np.unique(labels) if v >= 0))
    name = _class_name(source, class_index)
    label = f"class {class_index}" + (f" ({name!r})" if name else "")
    if not present:
        return ValueError(
            f"no images of {label}: the given {type(source).__name__} has no class labels (all -1); "
            f"pass the class's images as a tensor, or a folder with one subfolder per class"
        )
    return ValueError(
        f"no images of {label} in the given {type(source).__name__}; classes present: "
        f"{present[:50]}{' ...' if len(present) > 50 else ''}"
    )


def _sample(indices: np.ndarray, n: Optional[int], seed: int) -> np.ndarray:
    if n is None or n >= len(indices):
        return indices
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=n, replace=False))


def class_indices(dataset: torch.utils.data.Dataset, class_index: int, n: Optional[int] = 128,
                  seed: int = 0) -> np.ndarray:
    """Sorted indices of up to ``n`` images of class ``class_index`` (a deterministic random
    sample for ``seed``; ``n=None`` = all of them).

    >>> from tb_conceptevo.probes import ConceptShapes
    >>> class_indices(ConceptShapes(n=64, size=16), 3, n=4)
    array([17, 30, 33, 55])
    """
    class_index = _check_class_index(class_index)
    labels = _dataset_labels(dataset)
    indices = np.flatnonzero(labels == class_index)
    if len(indices) == 0:
        raise _no_images_error(class_index, labels, dataset)
    return _sample(indices, n, seed)


def class_images(probe_or_dataset: torch.utils.data.Dataset, class_index: int, n: Optional[int] = 128,
                 seed: int = 0) -> torch.Tensor:
    """Up to ``n`` images ``[n, 3, H, W]`` of one class from a ProbeSet or any dataset
    returning ``(image, label)``, sampled deterministically with ``seed``.

    >>> from tb_conceptevo.probes import ConceptShapes
    >>> class_images(ConceptShapes(n=1024, size=32), class_index=2, n=128, seed=0).shape
    torch.Size([128, 3, 32, 32])
    """
    indices = class_indices(probe_or_dataset, class_index, n=n, seed=seed)
    if isinstance(probe_or_dataset, ProbeSet) and callable(getattr(probe_or_dataset, "images", None)):
        return probe_or_dataset.images(indices)  # one batched read (e.g. ConceptShapes' cache)
    return torch.stack([torch.as_tensor(probe_or_dataset[int(i)][0]) for i in indices])


def _check_class_index(class_index) -> int:
    if isinstance(class_index, bool) or not isinstance(class_index, (int, np.integer)):
        raise TypeError(f"class_index must be an int, got {type(class_index).__name__}")
    if class_index < 0:
        raise ValueError(f"class index {class_index} is out of range: it must be >= 0")
    return int(class_index)


class _ClassBatches:
    """Batches of a class's images from a tensor, a Dataset/ProbeSet or a DataLoader.

    ``total`` is the number of images when known in advance (None for a DataLoader).
    """

    def __init__(self, images: ImageSource, class_index: int, labels=None, batch_size: int = 64,
                 max_images: Optional[int] = None, seed: int = 0):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.class_index = class_index
        self.batch_size = batch_size
        self.max_images = max_images
        self.source = images
        self.class_name = _class_name(images, class_index)
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if isinstance(images, torch.Tensor):
            if images.dim() < 2:
                raise ValueError(f"images must be a batch [B, 3, H, W], got shape {list(images.shape)}")
            if labels is not None:
                labels = torch.as_tensor(labels).reshape(-1).cpu()
                if labels.shape[0] != images.shape[0]:
                    raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
                keep = np.flatnonzero(labels.numpy() == class_index)
                if len(keep) == 0:
                    raise _no_images_error(class_index, labels.numpy(), images)
                images = images[torch.from_numpy(keep)]
            if images.shape[0] == 0:
                raise ValueError(f"no images of class {class_index}: the image tensor is empty")
            keep = _sample(np.arange(images.shape[0]), max_images, seed)
            self.tensor = images[torch.from_numpy(keep)] if len(keep) < images.shape[0] else images
            self.total = int(self.tensor.shape[0])
            self.kind = "tensor"
        elif isinstance(images, torch.utils.data.DataLoader):
            self.loader = images
            self.total = None
            self.kind = "loader"
        elif isinstance(images, torch.utils.data.Dataset):
            self.indices = class_indices(images, class_index, n=max_images, seed=seed)
            self.total = len(self.indices)
            self.kind = "dataset"
        else:
            raise TypeError(
                f"images must be a tensor [B, 3, H, W], a Dataset/ProbeSet or a DataLoader, "
                f"got {type(images).__name__}"
            )

    def __len__(self) -> int:
        if self.total is not None:
            return math.ceil(self.total / self.batch_size)
        return len(self.loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.kind == "tensor":
            yield from self.tensor.split(self.batch_size)
        elif self.kind == "dataset":
            if isinstance(self.source, ProbeSet) and callable(getattr(self.source, "images", None)):
                # ProbeSets like ConceptShapes slice a whole batch at once.
                for chunk in np.array_split(self.indices, len(self)):
                    yield self.source.images(chunk)
                return
            subset = torch.utils.data.Subset(self.source, self.indices.tolist())
            loader = torch.utils.data.DataLoader(subset, batch_size=self.batch_size, shuffle=False)
            for batch in loader:
                yield batch[0] if isinstance(batch, (tuple, list)) else batch
        else:
            seen = 0
            found_labels = []
            for batch in self.loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError("a DataLoader must yield (images, labels) batches to select a class")
                x, y = batch[0], torch.as_tensor(batch[1]).reshape(-1)
                found_labels.append(y.cpu())
                mask = y.to(x.device) == self.class_index
                x = x[mask]
                if self.max_images is not None:
                    x = x[: self.max_images - seen]
                if x.shape[0]:
                    seen += x.shape[0]
                    yield x
                if self.max_images is not None and seen >= self.max_images:
                    return
            if seen == 0:
                labels = torch.cat(found_labels).numpy() if found_labels else np.zeros(0, np.int64)
                raise _no_images_error(self.class_index, labels, self.loader)


def _progress(iterable, enabled: bool, desc: str, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


# --------------------------------------------------------------------------- Eq. 7-9


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
            if name in z_from:
                raise ValueError(
                    f"layer {name!r} ran twice in one forward pass; importance needs each "
                    f"analysed module to run once per pass (pick another layer)"
                )
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

    Example:

        >>> import torch
        >>> from tb_conceptevo.probes import ConceptShapes
        >>> def small_cnn():  # two "snapshots" of one architecture (untrained here)
        ...     return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        ...                                torch.nn.Flatten(), torch.nn.Linear(8, 6))
        >>> model_epoch3, model_epoch9 = small_cnn(), small_cnn()
        >>> probe = ConceptShapes(n=64, size=16)        # labels: the shape (class 2 = triangle)
        >>> result = concept_evolution_importance(model_epoch3, model_epoch9, probe, class_index=2,
        ...                                       max_images=128, from_step=3, to_step=9, progress=False)
        >>> result.n_images, len(result.top(5))    # (layer, channel, importance) of the top 5
        (12, 5)
    """
    class_index = _check_class_index(class_index)
    layer_names = _layer_names(model_from, layers)
    check_same_architecture(model_from, model_to, layer_names)
    batches = _ClassBatches(images, class_index, labels, batch_size, max_images, seed)
    if class_name is None:
        class_name = batches.class_name

    positive: Dict[str, torch.Tensor] = {}
    finite_sum: Dict[str, torch.Tensor] = {}
    nonfinite: Dict[str, torch.Tensor] = {}
    n_images = 0
    with _evaluation_state(model_from), _evaluation_state(model_to):
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
    if n_images == 0:
        raise ValueError(f"no images of class {class_index} were given")

    per_layer: Dict[str, LayerImportance] = {}
    for name in layer_names:
        pos = positive[name].cpu().numpy().astype(np.int64)
        bad = nonfinite[name].cpu().numpy().astype(np.int64)
        flagged = bad > 0
        importance = (pos / n_images).astype(np.float32)
        mean = (finite_sum[name].cpu().numpy() / n_images).astype(np.float32)
        importance[flagged] = np.nan
        mean[flagged] = np.nan
        per_layer[name] = LayerImportance(name, importance, mean, pos, flagged, bad)
    return ImportanceResult(class_index, n_images, per_layer, class_name, from_step, to_step)


# --------------------------------------------------------------------------- revert evaluation


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

    Example:

        >>> import torch
        >>> from tb_conceptevo.probes import ConceptShapes
        >>> def small_cnn():  # two "snapshots" of one architecture (untrained here)
        ...     return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        ...                                torch.nn.Flatten(), torch.nn.Linear(8, 6))
        >>> model_epoch3, model_epoch9 = small_cnn(), small_cnn()
        >>> probe = ConceptShapes(n=64, size=16)        # labels: the shape (class 2 = triangle)
        >>> table = revert_evaluation(model_epoch3, model_epoch9, probe, 2, progress=False)
        >>> print(table.table())                   # doctest: +ELLIPSIS
        class 2: baseline accuracy ... (12 images, 1 layers)
               bin   mean change       std
             0-25%  ...
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
    if isinstance(importance, ImportanceResult):
        if importance.class_index != class_index:
            raise ValueError(
                f"importance was computed for class {importance.class_index}, not {class_index}"
            )
        scores = {name: li for name, li in importance.layers.items()}
    elif isinstance(importance, Mapping):
        scores = {}
        for name, values in importance.items():
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            flagged = ~np.isfinite(values)
            scores[name] = LayerImportance(name, values, np.where(flagged, np.nan, 0.0),
                                           np.zeros(len(values), np.int64), flagged,
                                           flagged.astype(np.int64))
    else:
        raise TypeError(f"importance must be an ImportanceResult or a mapping, got {type(importance).__name__}")
    if layers is None:
        layer_names = list(scores)
        _layer_names(model_from, layer_names)
    else:
        layer_names = _layer_names(model_from, layers)
    missing = [name for name in layer_names if name not in scores]
    if missing:
        raise ValueError(f"importance has no values for layer(s) {missing}; it covers {list(scores)}")
    check_same_architecture(model_from, model_to, layer_names)

    # Channel masks [configs, C] per layer: n_bins importance bins, then one random bin per seed.
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

    batches = _ClassBatches(images, class_index, labels, batch_size, max_images, seed)
    device_to, dtype_to = model_device_dtype(model_to)
    device_from, dtype_from = model_device_dtype(model_from)
    n_configs = n_bins + len(seeds)
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
                stored = z_from[name].to(device_to, dtype_to)
                state = {"mask": None}

                def substitute(module, inputs, output, name=name, stored=stored, state=state):
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

                with _forward_hooks(model_to, {name: substitute}, x_to[:1]):
                    for k in range(n_configs):
                        state["mask"] = masks[name][k]
                        c, s = score_batch(_as_logits(model_to(x_to), class_index))
                        correct[li, k] += c
                        logit_sum[li, k] += s
    if n_images == 0:
        raise ValueError(f"no images of class {class_index} were given")

    base_accuracy = base_correct.cpu().numpy() / n_images
    accuracy_change = correct.cpu().numpy() / n_images - base_accuracy
    logit_change = (logit_sum.cpu().numpy() - base_logit.cpu().numpy()) / n_images
    if isinstance(importance, ImportanceResult):
        class_name = class_name or importance.class_name
        from_step = importance.from_step if from_step is None else from_step
        to_step = importance.to_step if to_step is None else to_step
    class_name = class_name or batches.class_name
    return RevertResult(
        class_index=class_index,
        n_images=n_images,
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


# --------------------------------------------------------------------------- event payloads


def _step(value) -> Optional[int]:
    return None if value is None else int(value)


def importance_payload(result: ImportanceResult, layer: str) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """``(header, arrays)`` of one layer's importance, for :func:`tb_conceptevo.summary.pack`
    under the tag ``metadata.importance_tag(result.class_index, layer)`` at step ``to_step``.

    Header: ``kind="importance"``, ``class_index``, ``class_name`` (or null), ``from_step``,
    ``to_step``, ``layer``, ``n_images``, ``n_neurons``, ``n_flagged``.
    Arrays (``[C]`` each): ``importance`` <f4 (Eq. 9; NaN = flagged), ``mean_sensitivity``
    <f4 (NaN = flagged), ``positive_count`` <i4, ``flagged`` |u1 (1 = non-finite S_n).
    """
    metadata.check_name(layer, "layer")
    li = result.layers[layer]
    header = {
        "kind": metadata.IMPORTANCE,
        "class_index": int(result.class_index),
        "class_name": result.class_name,
        "from_step": _step(result.from_step),
        "to_step": _step(result.to_step),
        "layer": layer,
        "n_images": int(result.n_images),
        "n_neurons": li.n_neurons,
        "n_flagged": int(li.flagged.sum()),
    }
    arrays = {
        "importance": li.importance.astype("<f4"),
        "mean_sensitivity": li.mean_sensitivity.astype("<f4"),
        "positive_count": li.positive_count.astype("<i4"),
        "flagged": li.flagged.astype("|u1"),
    }
    return header, arrays


def importance_payloads(result: ImportanceResult) -> Dict[str, Tuple[Dict, Dict[str, np.ndarray]]]:
    """``{tag: (header, arrays)}`` for every layer of ``result``."""
    return {
        metadata.importance_tag(result.class_index, layer): importance_payload(result, layer)
        for layer in result.layers
    }


def revert_payload(result: RevertResult) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """``(header, arrays)`` of a revert evaluation, for the tag
    ``metadata.revert_tag(result.class_index)`` at step ``to_step``.

    Header: ``kind="revert"``, ``class_index``, ``class_name``, ``from_step``, ``to_step``,
    ``layers`` (row order), ``bin_labels``, ``seeds``, ``n_images``, ``metric``
    (``"top1_accuracy"``), ``baseline_accuracy``, ``random_mean``, ``random_std``.
    Arrays: ``bin_accuracy_change`` <f4 [L, n_bins], ``random_accuracy_change`` <f4
    [L, n_seeds], ``bin_logit_change`` <f4 [L, n_bins], ``random_logit_change`` <f4
    [L, n_seeds], ``bin_sizes`` <i4 [L, n_bins], ``random_sizes`` <i4 [L],
    ``mean_change`` <f4 [n_bins], ``std_change`` <f4 [n_bins].
    """
    for layer in result.layers:
        metadata.check_name(layer, "layer")
    header = {
        "kind": metadata.REVERT,
        "class_index": int(result.class_index),
        "class_name": result.class_name,
        "from_step": _step(result.from_step),
        "to_step": _step(result.to_step),
        "layers": list(result.layers),
        "bin_labels": list(result.bin_labels),
        "seeds": [int(s) for s in result.seeds],
        "n_images": int(result.n_images),
        "metric": "top1_accuracy",
        "baseline_accuracy": float(result.baseline_accuracy),
        "random_mean": float(result.random_mean),
        "random_std": float(result.random_std),
    }
    arrays = {
        "bin_accuracy_change": result.bin_accuracy_change.astype("<f4"),
        "random_accuracy_change": result.random_accuracy_change.astype("<f4"),
        "bin_logit_change": result.bin_logit_change.astype("<f4"),
        "random_logit_change": result.random_logit_change.astype("<f4"),
        "bin_sizes": result.bin_sizes.astype("<i4"),
        "random_sizes": result.random_sizes.astype("<i4"),
        "mean_change": result.mean_change.astype("<f4"),
        "std_change": result.std_change.astype("<f4"),
    }
    return header, arrays
