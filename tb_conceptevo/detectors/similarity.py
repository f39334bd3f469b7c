"""Neuron-concept similarity functions of CLIP-Dissect (Oikarinen & Weng 2022), vectorised
over all neurons x concepts:

* **soft-WPMI** (default)::

      P          = softmax(a * S, over concepts)                       [M, K]
      e_1..e_k   = the top_k images of neuron n (highest activation first)
      p_j        = p_start - (j / top_k) * (p_start - p_end),  j = 0..top_k-1
      log p(d|n) = sum_j log(1 + p_j * (P[e_j, d] - 1) + 1e-7)
      log p(d)   = logsumexp_n log p(d|n) - log N       (over the layer's N neurons)
      sim[n, d]  = log p(d|n) - lambda * log p(d)

  Unbounded and relative to the other neurons of the layer: not a probability.
* **cos^3**: centre ``A`` and ``S`` over images, cube, L2-normalise each column over
  images, dot product: ``sim = A'^T S'`` in [-1, 1].

``A`` is the ``[images, neurons]`` response matrix, ``S`` the ``[images, concepts]``
CLIP image-text similarity.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: elements of one block of soft-WPMI terms (1 MB float32: stays in a core's cache;
#: 1-4 MB blocks were fastest on the benchmark, larger ones slower)
_WPMI_BLOCK = 1 << 18
#: ... on other devices (GPUs: few large kernels beat many cache-sized ones; 256 MB)
_WPMI_BLOCK_DEVICE = 1 << 26


def soft_wpmi(clip_similarity: torch.Tensor, responses: torch.Tensor, top_k: int = 100, a: float = 10.0,
              lam: float = 1.0, p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7,
              block_elements: Optional[int] = None) -> torch.Tensor:
    """Soft-WPMI ``[N, K]`` of neurons vs concepts (see the module docstring).

    ``log p(d|n)`` from :func:`soft_wpmi_log_given`, minus ``lam`` times the layer's
    ``log p(d)``; arguments as there."""
    log_given = soft_wpmi_log_given(clip_similarity, responses, top_k, a, p_start, p_end, min_prob, block_elements)
    return log_given - lam * soft_wpmi_log_prior(log_given)


def soft_wpmi_log_prior(log_given: torch.Tensor) -> torch.Tensor:
    """``[1, K]`` ``log p(d) = logsumexp_n log p(d|n) - log N``."""
    return torch.logsumexp(log_given, dim=0, keepdim=True) - math.log(log_given.shape[0])


def soft_wpmi_log_given(clip_similarity: torch.Tensor, responses: torch.Tensor, top_k: int = 100, a: float = 10.0,
                        p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7,
                        block_elements: Optional[int] = None) -> torch.Tensor:
    """``log p(d|n)`` ``[N, K]`` of soft-WPMI: how well neuron n's top images agree on word d.

    Same value as in :func:`soft_wpmi_plain`, computed faster: the sum of ``top_k`` logs
    is the log of their product, so the terms are multiplied in groups of ``g`` and
    only one log per group is taken (``g`` as large as the dtype allows: every term is
    at least ``1 - p_start + min_prob``, so a product of ``g`` terms stays a normal
    float); and the ``[neurons, top_k, K]`` terms are made in blocks of neurons that
    stay in cache, updated in place.  Computed in the dtype of ``clip_similarity``
    (float32 by default; float64 for exact comparisons).

    Args:
        clip_similarity: ``[M, K]`` image-text cosine similarities.
        responses: ``[M, N]`` neuron responses on the same M images (finite).
        top_k: images per neuron (clipped to M).
        block_elements: elements of one block of terms (default: cache-sized on CPU,
            large on other devices).
    """
    _check_pair(clip_similarity, responses)
    dtype = clip_similarity.dtype if clip_similarity.dtype == torch.float64 else torch.float32
    n_images, n_neurons = responses.shape
    k = int(min(top_k, n_images))
    probs = torch.softmax(a * clip_similarity.to(dtype), dim=1)                      # [M, K]
    n_concepts = probs.shape[1]
    top_images = torch.topk(responses.to(dtype), k, dim=0).indices.t()               # [N, k]
    weights = p_start - torch.arange(k, dtype=torch.float64) / top_k * (p_start - p_end)
    smallest = 1.0 - p_start + min_prob                    # least possible term (P = 0)
    tiny = 1e-30 if dtype == torch.float32 else 1e-290     # well above the dtype's least normal
    group = max(1, min(k, int(math.log(tiny) / math.log(smallest))))
    n_groups = -(-k // group)
    group = -(-k // n_groups)                              # equal groups, the last padded
    pad = n_groups * group - k
    # term = weight * P + offset; padding terms are exactly 1 (weight 0, offset 1)
    scale = torch.cat([weights, torch.zeros(pad, dtype=torch.float64)]).to(device=probs.device, dtype=dtype)
    offset = torch.cat([1.0 - weights + min_prob, torch.ones(pad, dtype=torch.float64)]).to(device=probs.device, dtype=dtype)
    scale, offset = scale.view(1, n_groups, group, 1), offset.view(1, n_groups, group, 1)
    if pad:
        top_images = torch.cat([top_images, top_images[:, :1].expand(-1, pad)], dim=1)
    log_given = torch.empty((n_neurons, n_concepts), dtype=dtype, device=probs.device)
    if block_elements is None:
        block_elements = _WPMI_BLOCK if probs.device.type == "cpu" else _WPMI_BLOCK_DEVICE
    step = max(1, block_elements // max(1, n_groups * group * n_concepts))
    for start in range(0, n_neurons, step):  # blocks of neurons: the terms stay in cache
        terms = probs[top_images[start:start + step]].view(-1, n_groups, group, n_concepts)
        terms.mul_(scale).add_(offset)
        log_given[start:start + step] = terms.prod(dim=2).log_().sum(dim=1)
    return log_given


def soft_wpmi_plain(clip_similarity: torch.Tensor, responses: torch.Tensor, top_k: int = 100, a: float = 10.0,
                    lam: float = 1.0, p_start: float = 0.998, p_end: float = 0.97,
                    min_prob: float = 1e-7) -> torch.Tensor:
    """Soft-WPMI the straightforward way of the public CLIP-Dissect code, on the full
    tensor: one ``[N, top_k, K]`` gather of probabilities, ``torch.log``, a sum.

    The reference that :func:`soft_wpmi` is tested (``tests/test_detectors_clip.py``)
    and benchmarked (``benchmarks/bench_detectors.py``) against; memory O(N x top_k x K).
    """
    _check_pair(clip_similarity, responses)
    n_neurons = responses.shape[1]
    k = int(min(top_k, responses.shape[0]))
    probs = torch.softmax(a * clip_similarity, dim=1)
    top_images = torch.topk(responses, k, dim=0).indices.t()
    weights = (p_start - torch.arange(k, dtype=probs.dtype) / top_k * (p_start - p_end))[None, :, None]
    log_given = torch.log(1 + weights * (probs[top_images] - 1) + min_prob).sum(dim=1)
    log_prior = torch.logsumexp(log_given, dim=0, keepdim=True) - math.log(n_neurons)
    return log_given - lam * log_prior


def cube_normalise(values: torch.Tensor, min_norm: float = 1e-6) -> torch.Tensor:
    """Centre each column over rows (images), cube, L2-normalise each column."""
    centred = values - values.mean(dim=0, keepdim=True)
    cubed = centred ** 3
    return cubed / cubed.norm(dim=0, keepdim=True).clamp(min=min_norm)


def cos_cubed(clip_similarity: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """cos^3 similarity ``[N, K]``: ``cube_normalise(A)^T @ cube_normalise(S)``."""
    _check_pair(clip_similarity, responses)
    return cube_normalise(responses.float()).t() @ cube_normalise(clip_similarity.float())


def _check_pair(clip_similarity: torch.Tensor, responses: torch.Tensor) -> None:
    if clip_similarity.dim() != 2 or responses.dim() != 2:
        raise ValueError("clip_similarity must be [images, concepts] and responses [images, neurons]")
    if clip_similarity.shape[0] != responses.shape[0]:
        raise ValueError(f"{clip_similarity.shape[0]} images of CLIP similarities vs {responses.shape[0]} "
                         "images of neuron responses")
