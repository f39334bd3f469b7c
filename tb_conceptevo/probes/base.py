"""The probe-set interface: a fixed, ordered, content-hashed image set.

Every run compared in one map must use the same probe set; its :attr:`ProbeSet.hash`
is written with every snapshot and spaces refuse observations with another hash.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class ConceptVocabulary:
    """Concept words with one category each (e.g. "red" -> "colour")."""

    names: Tuple[str, ...]
    categories: Tuple[str, ...]

    def __post_init__(self):
        if len(self.names) != len(self.categories):
            raise ValueError("names and categories must have the same length")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)


class ProbeSet(torch.utils.data.Dataset, abc.ABC):
    """Base class of probe sets.

    ``probe[i]`` returns ``(image, label)``: ``image`` a float32 tensor ``[3, H, W]``
    ready for the model (after the optional ``transform``), ``label`` an int (-1 when
    unknown).  All images of a probe set have the same size.
    """

    #: optional callable applied to the float [0, 1] image tensor (e.g. Normalize)
    transform = None

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]: ...

    @property
    def hash(self) -> str:
        """Hex SHA-256 of the images' content and order (stable across processes and
        machines); computed once and cached (see :func:`~tb_conceptevo.probes.content_hash`)."""
        from .hashing import content_hash

        return content_hash(self)

    def load_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """float32 ``[B, 3, H, W]`` model inputs for ``indices`` (transform applied).

        The recorder calls this instead of a per-image DataLoader; subclasses that can
        build a batch at once (procedural sets, in-memory tensors) override it.
        """
        return torch.stack([self[int(i)][0] for i in indices])

    @property
    def image_size(self) -> Tuple[int, int]:
        """``(H, W)`` of the images."""
        image, _ = self[0]
        return tuple(image.shape[-2:])

    def raw_images(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` of the untransformed images (for thumbnails)."""
        raise NotImplementedError

    @property
    def class_names(self) -> Optional[List[str]]:
        return None

    #: ``"model"``: ``class_names[i]`` is the model's class ``i`` (labels are model class
    #: indices); ``"folders"``: names are sorted folder names, maybe not the model's order
    class_order: Optional[str] = "model"

    @property
    def labels(self) -> Optional[np.ndarray]:
        """int64 ``[n]`` class labels, or None."""
        return None

    @property
    def vocabulary(self) -> Optional[ConceptVocabulary]:
        """The concepts annotated in this probe set, or None."""
        return None

    @property
    def has_masks(self) -> bool:
        return False

    def masks(self, indices: torch.Tensor) -> torch.Tensor:
        """bool ``[B, C, H, W]``: pixel mask of every vocabulary concept in each image
        (all False where the concept is absent)."""
        raise NotImplementedError(f"{type(self).__name__} has no concept masks")

    def mask_codes(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """Optional fast path: int64 ``[B, H, W]`` with bit ``c`` set where concept ``c``'s
        mask covers the pixel (at most 62 concepts), i.e. :meth:`masks` packed.  None
        (the default) means "use masks()"; a probe whose masks have structure can
        compute this far more cheaply than the ``C`` full-size masks."""
        return None
