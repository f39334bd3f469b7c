"""What a :class:`~.detector.NetDissect` keeps between logged steps, each with a memory bound.

Every logged step dissects the same probe set at the same layer sizes, so the mask
pattern table (a full read of the masks to rebuild), the bilinear tables and the
arrays of the candidate stores (~100 MB to allocate afresh, in page faults) are kept
for the next step.  The detector owns them; two detectors share nothing.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable

import torch


class BoundedCache:
    """Values by key, at most ``max_entries`` of them; a new key beyond that drops them all
    (one run needs few entries, each rebuilt in one step's time)."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._entries: Dict[Hashable, object] = {}

    def get(self, key: Hashable, build: Callable[[], object]):
        """The value of ``key``, from ``build()`` the first time."""
        if key not in self._entries:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = build()
        return self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class BufferPool:
    """Arrays handed back by finished candidate stores, by (shape, dtype, device), at most
    ``max_bytes`` in all; a store of the next step takes the one of its shape."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._arrays: Dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _key(shape, dtype, device) -> tuple:
        return tuple(shape), dtype, str(device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._arrays.values())

    def take(self, shape: tuple, dtype, device) -> torch.Tensor:
        """An uninitialised tensor of this shape: a pooled one, else new."""
        buffer = self._arrays.pop(self._key(shape, dtype, device), None)
        return buffer if buffer is not None else torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor) -> None:
        """Keep ``tensor`` for a later :meth:`take` while the pool stays within ``max_bytes``."""
        if tensor is None or not tensor.numel():
            return
        if self.nbytes + tensor.numel() * tensor.element_size() <= self.max_bytes:
            self._arrays[self._key(tensor.shape, tensor.dtype, tensor.device)] = tensor

    def clear(self) -> None:
        self._arrays.clear()
