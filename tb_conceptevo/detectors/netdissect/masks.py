"""A probe set's concept masks as NetDissect reads them: per pixel one *pattern* id.

A pattern is the set of concepts covering a pixel.  Counting each neuron's active
pixels per pattern and multiplying by the patterns' concept bits gives every
neuron x concept intersection at once (see :class:`MaskPatterns`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

from .upsample import CHUNK_ELEMENTS

class MaskPatterns:
    """The probe set's masks as one pattern id per pixel.

    A pattern is a distinct set of concepts covering a pixel; masks have few of them
    (ConceptShapes at 64 px: a few hundred over millions of pixels), so the
    intersections of all neurons with all concepts are ``hits[N, P] @ bits[P, C]``,
    where ``hits`` counts each neuron's active pixels per pattern with one bincount.
    """

    def __init__(self, pixel_pattern: torch.Tensor, bits: torch.Tensor, pixel_count: torch.Tensor,
                 size: Tuple[int, int]):
        self.pixel_pattern = pixel_pattern      # int64 [n * H * W], image-major
        self.bits = bits                        # float64 [P, C]
        self.concept_count = pixel_count.double() @ bits   # [C] pixels covered per concept
        self.height, self.width = size

    @property
    def n_patterns(self) -> int:
        return int(self.bits.shape[0])


#: concepts per int64 code word (bit 63 stays free so codes are non-negative)
_BITS_PER_WORD = 62


class ProbeMasks:
    """The concept masks of a probe set, restricted to a detector's concepts.

    Args:
        probe: the probe set (``masks(indices)`` -> bool ``[B, C, H, W]``; optionally
            ``mask_codes(indices)`` -> its masks packed as int64 ``[B, H, W]``).
        mask_channels: indices of the concepts among the probe's mask channels (None:
            all, in order).
        n_concepts: the detector's concepts; n_images: the probe set's images.
    """

    def __init__(self, probe, mask_channels: Optional[torch.Tensor], n_concepts: int, n_images: int):
        self.probe = probe
        self.mask_channels = mask_channels
        self.n_concepts = n_concepts
        self.n_images = n_images

    def cache_key(self, device) -> tuple:
        """Equal keys give equal pattern tables (the probe's content hash when it has one)."""
        channels = None if self.mask_channels is None else tuple(self.mask_channels.tolist())
        return (type(self.probe).__name__, str(getattr(self.probe, "hash", id(self.probe))),
                self.n_images, channels, str(device))

    def patterns(self, device, kernels=None) -> MaskPatterns:
        """Pattern ids of every mask pixel (``kernels``: the compiled loops, used on CPU)."""
        first = self.masks(torch.arange(1), device)
        height, width = int(first.shape[-2]), int(first.shape[-1])
        n_words = max(1, math.ceil(self.n_concepts / _BITS_PER_WORD))
        # int64 temporaries of [b, min(C, 62), H, W] (> 31 concepts): a quarter chunk
        step = max(1, CHUNK_ELEMENTS // (4 * min(self.n_concepts, _BITS_PER_WORD) * height * width))
        kernels = kernels if torch.device(device).type == "cpu" and n_words == 1 else None
        words = []
        for start in range(0, self.n_images, step):
            chunk = torch.arange(start, min(self.n_images, start + step))
            mask_codes = getattr(self.probe, "mask_codes", None)
            codes = mask_codes(chunk) if mask_codes and kernels is not None and self.mask_channels is None else None
            if codes is not None:  # the probe packs its own masks
                codes = torch.as_tensor(codes, dtype=torch.int64)
                if tuple(codes.shape) != (chunk.numel(), height, width):
                    raise ValueError(f"probe.mask_codes() must return [B, H, W] = {(chunk.numel(), height, width)} "
                                     f"(the masks' size), got shape {tuple(codes.shape)}")
                words.append(codes.cpu().reshape(-1, 1))
                continue
            masks = self.masks(chunk, device)
            if kernels is not None:
                codes = np.empty((masks.shape[0], height, width), dtype=np.int64)
                kernels.pack_masks(masks.numpy(), codes)
                words.append(torch.from_numpy(codes).reshape(-1, 1))
            else:
                words.append(_pack_bits(masks))                    # [b*H*W, words]
        words = torch.cat(words)
        shifts = torch.arange(_BITS_PER_WORD, device=device)
        if kernels is not None:
            # one linear scan (hashing) instead of sorting every pixel's code
            pattern = torch.empty(words.shape[0], dtype=torch.int64)
            codes = torch.from_numpy(kernels.dense_ids(words[:, 0].numpy(), pattern.numpy()))
            pixel_count = torch.bincount(pattern, minlength=codes.numel())
            bits = ((codes[:, None] >> shifts) & 1)[:, :self.n_concepts]
            return MaskPatterns(pattern, bits.double(), pixel_count, (height, width))
        if n_words == 1:
            # up to 62 concepts: the code word is the pattern; its sorted distinct
            # values give the ids and the bits (one sort, no representative search)
            codes, pattern = torch.unique(words[:, 0], return_inverse=True)
            pixel_count = torch.bincount(pattern, minlength=codes.numel())
            bits = ((codes.long()[:, None] >> shifts) & 1)[:, :self.n_concepts]
            return MaskPatterns(pattern, bits.double(), pixel_count, (height, width))
        words = words.long()
        # distinct rows of the code words -> dense pattern ids (one unique per word)
        pattern = torch.zeros(words.shape[0], dtype=torch.int64, device=device)
        for w in range(n_words):
            _, word_id = torch.unique(words[:, w], return_inverse=True)
            combined = pattern * (int(word_id.max()) + 1) + word_id if words.numel() else pattern
            _, pattern = torch.unique(combined, return_inverse=True)
        n_patterns = int(pattern.max()) + 1 if pattern.numel() else 0
        pixel_count = torch.bincount(pattern, minlength=n_patterns)
        representative = torch.full((n_patterns,), words.shape[0], dtype=torch.int64, device=device)
        representative.scatter_reduce_(0, pattern, torch.arange(words.shape[0], device=device), "amin")
        bits = ((words[representative][:, :, None] >> shifts) & 1).reshape(n_patterns, -1)[:, :self.n_concepts]
        return MaskPatterns(pattern, bits.double(), pixel_count, (height, width))

    def masks(self, indices: torch.Tensor, device) -> torch.Tensor:
        """bool ``[B, C, H, W]`` masks of this detector's concepts."""
        masks = torch.as_tensor(self.probe.masks(indices))
        if masks.dim() != 4 or masks.shape[0] != indices.shape[0]:
            raise ValueError(f"probe.masks() must return [B, C, H, W], got shape {tuple(masks.shape)}")
        masks = masks.to(device=device, dtype=torch.bool)
        if self.mask_channels is not None:
            masks = masks[:, self.mask_channels.to(device)]
        return masks


def _pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """bool ``[B, C, H, W]`` -> ``[B*H*W, ceil(C / 62)]`` code words (bit j of word w = concept 62 w + j).

    int32 words when C <= 31 (int64 arithmetic is about twice as slow on CPU).
    """
    concepts = masks.shape[1]
    if concepts <= 31:
        weights = 1 << torch.arange(concepts, device=masks.device, dtype=torch.int32)
        word = (masks.to(torch.int32) * weights[None, :, None, None]).sum(dim=1, dtype=torch.int32)
        return word.reshape(-1, 1)                                              # [B*H*W, 1]
    words = []
    for start in range(0, concepts, _BITS_PER_WORD):  # one word per 62 concepts
        group = masks[:, start:start + _BITS_PER_WORD]
        weights = 1 << torch.arange(group.shape[1], device=masks.device, dtype=torch.int64)
        words.append((group.long() * weights[None, :, None, None]).sum(dim=1))   # [B, H, W]
    return torch.stack(words, dim=-1).reshape(-1, len(words))
