"""Probe sets from existing data: any ``torch.utils.data.Dataset`` or a folder of images.

Both adapters keep the order of their source (dataset index order; sorted relative
file paths), report a content hash (uint8 bytes for 8-bit sources, float32 bytes for
float tensors) and give uint8 thumbnails through :meth:`raw_images`.

Example:
    >>> import torch
    >>> data = torch.utils.data.TensorDataset(torch.rand(10, 3, 32, 32), torch.arange(10))
    >>> probe = DatasetProbe(data)
    >>> len(probe), probe.image_size, probe[2][1]
    (10, (32, 32), 2)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._pixels import (
    DEFAULT_BACKGROUND, _as_channels, _check_background, _check_channels, _size_of, _to_array, _to_tensor,
    _to_uint8, pil_to_rgb,
)
from .base import ProbeSet
from .hashing import content_hash

#: file extensions :class:`ImageFolderProbe` reads (case-insensitive)
IMAGE_EXTENSIONS: Tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)

_DEFAULT_IMAGE_KEYS = ("image", "img", "pixel_values", "input")
_DEFAULT_LABEL_KEYS = ("label", "labels", "target", "class")


def _is_label(value: Any) -> bool:
    """True for an integer class label (python/numpy int, or 0-d integer tensor/array)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_floating_point and not value.dtype.is_complex
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and np.issubdtype(value.dtype, np.integer)
    return False


class _ArrayProbe(ProbeSet):
    """Shared machinery: subclasses implement ``_load(index) -> (array, label)``."""

    _expected_size: Tuple[int, int]
    _warned_range = False
    #: channels of the model input (1: grayscale, 3: RGB); thumbnails and hash stay RGB
    channels = 3

    def _load(self, index: int) -> Tuple[np.ndarray, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _checked(self, index: int) -> Tuple[np.ndarray, int]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"{type(self).__name__} index must be an int, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a probe set of {len(self)} images")
        array, label = self._load(int(index))
        size = _size_of(array)
        if size != self._expected_size:
            raise ValueError(
                f"{type(self).__name__}: image {index} has size {size} but image 0 has "
                f"{self._expected_size}; all probe images must have the same size (resize "
                "them, e.g. with a torchvision Resize + CenterCrop in the dataset)"
            )
        if array.dtype != np.uint8 and not self._warned_range and (array.min() < 0 or array.max() > 1):
            self._warned_range = True
            warnings.warn(
                f"{type(self).__name__}: image {index} has values outside [0, 1] "
                f"({float(array.min()):.3g}..{float(array.max()):.3g}); thumbnails will be clipped. "
                "Give the probe set unnormalised images and put the normalisation in transform=.",
                stacklevel=3,
            )
        return array, label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        array, label = self._checked(index)
        image = _as_channels(_to_tensor(array), self.channels)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)

    def raw_images(self, indices: Union[Sequence[int], np.ndarray, torch.Tensor]) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` untransformed images (float sources clipped to [0, 1])."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        images = [_to_uint8(self._checked(int(i))[0]) for i in np.asarray(indices).reshape(-1)]
        if not images:
            return np.zeros((0, *self._expected_size, 3), np.uint8)
        return np.stack(images)

    def _content_chunk(self, indices: np.ndarray) -> List[np.ndarray]:
        return [self._checked(int(i))[0] for i in indices]

    @property
    def hash(self) -> str:
        """Content hash; the first call reads every image once (and so also checks
        that all have the same size)."""
        return content_hash(self, progress=len(self) >= 5000)

    @property
    def image_size(self) -> Tuple[int, int]:
        return self._expected_size


class DatasetProbe(_ArrayProbe):
    """A probe set over any map-style ``torch.utils.data.Dataset`` of images.

    Items may be ``(image, label, ...)`` tuples, dicts (``image_key`` / ``label_key``)
    or bare images; images may be PIL images (any mode, converted as :func:`pil_to_rgb`
    says: 16-bit scaled, transparency composited on ``background``, palette and CMYK
    converted), tensors ``[C, H, W]`` (uint8, or float in [0, 1]) or ndarrays
    (``[H, W, C]`` or ``[C, H, W]``; uint16 is scaled from 0..65535); grayscale is
    repeated to 3 channels and an array's alpha channel dropped.  Put normalisation in
    ``transform``, not in the dataset, so thumbnails and the hash see the real images.

    Args:
        dataset: the dataset (must have ``len``).
        n: use only the first ``n`` items (default: all).
        transform: callable on the float ``[3, H, W]`` image (e.g. ``Normalize``).
        image_key, label_key: keys for dict items (default: first of ``image``,
            ``img``, ``pixel_values``, ``input`` / ``label``, ``labels``, ``target``,
            ``class`` that is present).
        class_names: names of the label values (default: ``dataset.classes``).
        channels: channels the model takes: 3 (RGB, default) or 1 (grayscale: the
            gray value of grayscale images, luma of colour ones); applied before
            ``transform``.
        background: ``(r, g, b)`` transparent PIL images are composited on (default white).

    Example:
        >>> import torchvision
        >>> fake = torchvision.datasets.FakeData(8, image_size=(3, 32, 32), num_classes=4)
        >>> probe = DatasetProbe(fake)
        >>> probe.raw_images([0, 1]).shape
        (2, 32, 32, 3)
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        n: Optional[int] = None,
        transform: Optional[Callable] = None,
        image_key: Optional[str] = None,
        label_key: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
        channels: int = 3,
        background: Tuple[int, int, int] = DEFAULT_BACKGROUND,
    ):
        self.channels = _check_channels(channels)
        self.background = _check_background(background)
        try:
            available = len(dataset)
        except TypeError as error:
            raise TypeError(
                f"DatasetProbe needs a map-style dataset with len(); got {type(dataset).__name__}"
            ) from error
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"DatasetProbe: n must be a positive int or None, got {n!r}")
        if available == 0:
            raise ValueError("DatasetProbe: the dataset is empty; a probe set needs at least one image")
        if n is not None and n > available:
            raise ValueError(f"DatasetProbe: n={n} exceeds the dataset length {available}; use n<={available}")
        self.dataset = dataset
        self.n = available if n is None else int(n)
        self.transform = transform
        self.image_key = image_key
        self.label_key = label_key
        self._class_names = list(class_names) if class_names is not None else None
        if self._class_names is None and isinstance(getattr(dataset, "classes", None), (list, tuple)):
            self._class_names = [str(c) for c in dataset.classes]
        self._labels: Optional[np.ndarray] = None
        first, _ = self._load(0)
        self._expected_size = _size_of(first)

    def __len__(self) -> int:
        return self.n

    def _split(self, item: Any, index: int) -> Tuple[Any, int]:
        """(image, label) from one dataset item; label -1 when the item has none."""
        if isinstance(item, dict):
            key = self.image_key or next((k for k in _DEFAULT_IMAGE_KEYS if k in item), None)
            if key is None or key not in item:
                raise KeyError(
                    f"DatasetProbe: item {index} is a dict with keys {sorted(item)}; pass "
                    "image_key= naming the image entry"
                )
            label_key = self.label_key or next((k for k in _DEFAULT_LABEL_KEYS if k in item), None)
            label = item.get(label_key, -1) if label_key is not None else -1
            return item[key], (int(label) if _is_label(label) else -1)
        if isinstance(item, (tuple, list)):
            if not item:
                raise ValueError(f"DatasetProbe: item {index} is an empty {type(item).__name__}")
            label = item[1] if len(item) > 1 and _is_label(item[1]) else -1
            return item[0], int(label)
        return item, -1

    def _load(self, index: int) -> Tuple[np.ndarray, int]:
        image, label = self._split(self.dataset[index], index)
        return _to_array(image, index, self.background), label

    @property
    def labels(self) -> Optional[np.ndarray]:
        """int64 ``[n]`` labels (-1 where unknown) or None when no item has a label.

        Uses ``dataset.targets`` when present, else reads every item once (cached).
        """
        if self._labels is None:
            targets = getattr(self.dataset, "targets", None)
            if targets is not None and len(targets) == len(self.dataset):
                labels = np.asarray(targets[: self.n] if not isinstance(targets, torch.Tensor)
                                    else targets[: self.n].cpu().numpy(), dtype=np.int64)
            else:
                labels = np.array([self._split(self.dataset[i], i)[1] for i in range(self.n)], np.int64)
            self._labels = labels
        return None if (self._labels < 0).all() else self._labels.copy()

    @property
    def class_names(self) -> Optional[List[str]]:
        return list(self._class_names) if self._class_names is not None else None

    def __repr__(self) -> str:
        return (f"DatasetProbe({type(self.dataset).__name__}, n={self.n}, image_size={self._expected_size}, "
                f"channels={self.channels})")


class ImageFolderProbe(_ArrayProbe):
    """A probe set from a folder of image files.

    Files are found recursively (or only at the top level with ``recursive=False``),
    filtered by extension (case-insensitive; hidden files skipped) and sorted by their
    relative POSIX path, so the order and hash are the same on every machine.  Each
    image is converted to RGB as :func:`pil_to_rgb` says (16-bit scaled, transparency
    composited on ``background``, palette and CMYK converted, EXIF orientation applied),
    scaled so its shorter side is ``size`` and centre-cropped to ``size x size``.  When
    every file lies in a subfolder, the first-level folder names are the classes (as in
    torchvision's ``ImageFolder``; sorted, so class ``i`` is the ``i``-th name, which need
    not be your model's class ``i``); otherwise labels are -1.

    Building the probe opens every file's header (fast, no decoding) and reports all
    unreadable files at once; pixels are decoded on first use.

    Args:
        root: the folder.
        size: side of the square output images (pixels).
        transform: callable on the float ``[3, H, W]`` image.
        extensions: accepted file extensions.
        recursive: descend into subfolders.
        n: use only the first ``n`` files (sorted order).
        cache: keep decoded uint8 images in memory after the first read.
        channels: channels the model takes: 3 (RGB, default) or 1 (grayscale).
        background: ``(r, g, b)`` transparent pixels are composited on (default white).
        class_names: the model's class names in its output order; every first-level
            folder must be one of them and its images get that class index.  Without
            it, classes are the sorted folder names (:attr:`class_order` ``"folders"``),
            the model's order only if it was trained on these folders with
            torchvision's ``ImageFolder``.

    Example:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())            # my_images/cats/*.png, my_images/dogs/*.png
        >>> for name in ("dogs", "cats"):
        ...     (root / name).mkdir()
        ...     Image.new("RGBA", (80, 60), (200, 50, 0, 128)).save(root / name / "a.png")
        >>> probe = ImageFolderProbe(root, size=64)
        >>> probe.class_names, probe.class_order, probe.image_size
        (['cats', 'dogs'], 'folders', (64, 64))
        >>> ImageFolderProbe(root, size=64, class_names=["dogs", "cats"]).labels  # the model's order
        array([1, 0])
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        size: int = 64,
        transform: Optional[Callable] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        recursive: bool = True,
        n: Optional[int] = None,
        cache: bool = True,
        channels: int = 3,
        background: Tuple[int, int, int] = DEFAULT_BACKGROUND,
        class_names: Optional[Sequence[str]] = None,
    ):
        self.channels = _check_channels(channels)
        self.background = _check_background(background)
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"ImageFolderProbe: folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"ImageFolderProbe: {str(root)!r} is not a folder")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"ImageFolderProbe: size must be a positive int, got {size!r}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"ImageFolderProbe: n must be a positive int or None, got {n!r}")
        self.root = root
        self.size = int(size)
        self.transform = transform
        self.cache = bool(cache)
        suffixes = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        pattern = root.rglob("*") if recursive else root.glob("*")
        relative = sorted(
            path.relative_to(root).as_posix()
            for path in pattern
            if path.is_file()
            and path.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
        if not relative:
            raise ValueError(
                f"ImageFolderProbe: no image files ({', '.join(suffixes)}) found in {str(root)!r}"
                + ("" if recursive else " (recursive=False: subfolders were not searched)")
            )
        if n is not None:
            relative = relative[:n]
        self._check_headers(root, relative)
        self.files: List[str] = relative
        folders = [path.split("/")[0] if "/" in path else None for path in relative]
        self.class_order: Optional[str] = None
        if class_names is not None:
            self._class_names: Optional[List[str]] = [str(name) for name in class_names]
            if len(set(self._class_names)) != len(self._class_names):
                raise ValueError(f"ImageFolderProbe: class_names has duplicates: {self._class_names}")
            lookup = {name: i for i, name in enumerate(self._class_names)}
            unknown = sorted({str(f) for f in folders if f not in lookup})
            if unknown:
                raise ValueError(
                    f"ImageFolderProbe: folders {unknown} of {str(root)!r} are not in class_names "
                    f"{self._class_names}; every image must lie in a folder named after its class"
                )
            self._labels = np.array([lookup[f] for f in folders], np.int64)
            self.class_order = "model"
        elif all(folder is not None for folder in folders):
            self._class_names = sorted(set(folders))
            lookup = {name: i for i, name in enumerate(self._class_names)}
            self._labels = np.array([lookup[f] for f in folders], np.int64)
            self.class_order = "folders"
        else:
            self._class_names = None
            self._labels = np.full(len(relative), -1, np.int64)
        self._cache: List[Optional[np.ndarray]] = [None] * len(relative)
        self._expected_size = (self.size, self.size)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> Tuple[np.ndarray, int]:
        cached = self._cache[index]
        if cached is None:
            cached = self._decode(index)
            if self.cache:
                self._cache[index] = cached
        return cached, int(self._labels[index])

    @staticmethod
    def _check_headers(root: Path, relative: Sequence[str]) -> None:
        """Open every file's header (PIL reads no pixels here) and raise once, naming
        every file that is not a readable image."""
        from PIL import Image

        bad = []
        for name in relative:
            try:
                with Image.open(root / name) as image:
                    if min(image.size) < 1:
                        raise ValueError(f"empty image {image.size}")
            except Exception as error:  # any unreadable file: collect, report all at once
                bad.append(f"{name} ({type(error).__name__}: {error})")
        if bad:
            shown = "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
            raise ValueError(
                f"ImageFolderProbe: {len(bad)} of {len(relative)} files in {str(root)!r} are not readable "
                f"images; remove or fix them (or pass extensions= to skip them):\n  {shown}"
            )

    def _decode(self, index: int) -> np.ndarray:
        from PIL import Image, ImageOps

        path = self.root / self.files[index]
        try:
            with Image.open(path) as image:
                image = pil_to_rgb(image, self.background)
                # scale the shorter side to `size`, then centre-crop the longer one
                fitted = ImageOps.fit(image, (self.size, self.size), method=Image.BILINEAR, centering=(0.5, 0.5))
        except Exception as error:  # unreadable/corrupt file: name it
            raise ValueError(f"ImageFolderProbe: cannot read image {str(path)!r}: {error}") from error
        return np.asarray(fitted, dtype=np.uint8).copy()

    @property
    def labels(self) -> Optional[np.ndarray]:
        return None if self._class_names is None else self._labels.copy()

    @property
    def class_names(self) -> Optional[List[str]]:
        return list(self._class_names) if self._class_names is not None else None

    def __repr__(self) -> str:
        return f"ImageFolderProbe({str(self.root)!r}, n={len(self)}, size={self.size})"
