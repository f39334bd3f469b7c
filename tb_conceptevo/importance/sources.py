"""Class images for the importance computation: from a probe set, a dataset, a
tensor with labels or a DataLoader, in batches."""

from __future__ import annotations

import math
from typing import Iterator, Optional, Union

import numpy as np
import torch

from ..probes.base import ProbeSet


ImageSource = Union[torch.Tensor, np.ndarray, torch.utils.data.Dataset, torch.utils.data.DataLoader]


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
