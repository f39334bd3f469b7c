"""Stable content hash of a probe set: same images in the same order => same hash.

The hash is a hex SHA-256 over a fixed header (format tag, image count, height,
width) followed by every image in order, each framed by a one-byte dtype tag:

* ``b"u"`` + the uint8 ``[H, W, 3]`` bytes (row-major) when the probe set has exact
  8-bit content (procedural images, PNG/JPEG files, PIL datasets);
* ``b"f"`` + the float32 little-endian ``[3, H, W]`` bytes otherwise (float tensors).

Nothing machine-dependent (pointer sizes, byte order, numpy version) enters the
digest, so the value is stable across processes and machines.  Images are streamed
in chunks, so memory stays at one chunk whatever the size of the probe set.

Probe sets take part through an optional method ``_content_chunk(indices)`` that
returns either one array for the chunk (uint8 ``[B, H, W, 3]`` or float32
``[B, 3, H, W]``) or a list with one such array per image (``[H, W, 3]`` /
``[3, H, W]``), in order.  Without it the transformed ``probe[i][0]`` float images
are hashed.

Example:
    >>> import numpy as np
    >>> images = np.zeros((2, 8, 8, 3), np.uint8)
    >>> content_hash(images) == content_hash(images.copy())
    True
    >>> changed = images.copy(); changed[1, 0, 0, 0] = 1
    >>> content_hash(changed) == content_hash(images)
    False
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterable, List, Sequence, Union

import numpy as np
import torch

#: bump when the framing changes (old hashes then no longer match, as they should)
HASH_FORMAT = b"tb_conceptevo/probe-content/v1"

_CACHE_ATTRIBUTE = "_content_hash_cache"


def content_hash(
    images: Union["torch.utils.data.Dataset", np.ndarray, torch.Tensor],
    chunk_size: int = 256,
    progress: bool = False,
) -> str:
    """Hex SHA-256 of the images' content and order.

    Args:
        images: a probe set (any object with ``len()`` and ``[i] -> (image, label)``),
            or an array of images: uint8 ``[N, H, W, 3]`` or float ``[N, 3, H, W]``.
        chunk_size: images hashed per chunk (bounds memory).
        progress: show a tqdm bar.

    Returns:
        64 hex digits.  For probe sets the value is cached on the object
        (attribute ``_content_hash_cache``), so later calls are free.

    Example:
        >>> from tb_conceptevo.probes import ConceptShapes
        >>> probe = ConceptShapes(n=8)
        >>> content_hash(probe) == ConceptShapes(n=8).hash
        True
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return _hash_array(images, chunk_size)
    cached = getattr(images, _CACHE_ATTRIBUTE, None)
    if cached is not None:
        return cached
    digest = _hash_probe(images, chunk_size, progress)
    try:
        setattr(images, _CACHE_ATTRIBUTE, digest)
    except AttributeError:  # objects with __slots__: still correct, just not cached
        pass
    return digest


def _header(count: int, height: int, width: int) -> bytes:
    return HASH_FORMAT + struct.pack("<QII", count, height, width)


def _hash_array(images, chunk_size: int) -> str:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            "content_hash expects a non-empty image batch, uint8 [N, H, W, 3] or float "
            f"[N, 3, H, W]; got shape {tuple(images.shape)}"
        )
    if images.dtype == np.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [N, H, W, 3], got {images.shape}")
        height, width = images.shape[1:3]
    else:
        if images.shape[1] != 3:
            raise ValueError(f"float images must be [N, 3, H, W], got {images.shape}")
        height, width = images.shape[2:4]
    digest = hashlib.sha256(_header(len(images), height, width))
    for start in range(0, len(images), chunk_size):
        _update(digest, images[start:start + chunk_size])
    return digest.hexdigest()


def _hash_probe(probe, chunk_size: int, progress: bool) -> str:
    count = len(probe)
    if count == 0:
        raise ValueError("cannot hash an empty probe set: give it at least one image")
    height, width = probe.image_size
    digest = hashlib.sha256(_header(count, int(height), int(width)))
    chunk_method = getattr(probe, "_content_chunk", None)
    starts = range(0, count, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="hashing probe set", unit="chunk")
    for start in starts:
        indices = np.arange(start, min(count, start + chunk_size))
        if chunk_method is not None:
            chunk = chunk_method(indices)
        else:  # generic ProbeSet: hash what the model sees
            chunk = [probe[int(i)][0] for i in indices]
        _update(digest, chunk)
    return digest.hexdigest()


def _update(digest, chunk: Union[np.ndarray, Sequence]) -> None:
    """Feed one chunk (a batch array or a list of single images) to ``digest``."""
    images: Iterable = chunk
    for image in images:
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if image.dtype == np.uint8:
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"uint8 images are hashed as [H, W, 3], got {image.shape}")
            digest.update(b"u")
            digest.update(np.ascontiguousarray(image).tobytes())
        else:
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"float images are hashed as [3, H, W], got {image.shape}")
            digest.update(b"f")
            digest.update(np.ascontiguousarray(image, dtype="<f4").tobytes())


__all__: List[str] = ["content_hash", "HASH_FORMAT"]
