"""Each probe image's most responsive neurons, recorded in the same pass as the stimuli.

ConceptEvo's Step 2.1 embeds the images no base neuron has among its stimuli
("uncovered" images) *indirectly*: an uncovered image is linked to the neurons it
activates most, and through them to the covered images those neurons respond to.
The top-k stimuli of the neurons (what observations keep) give only the inverse
links (image -> the neurons that have it in their top-k), which are empty for exactly
the uncovered images.  :class:`ImageLinksRecorder` keeps the forward links: for every
probe image and layer, the ``k`` channels with the highest response.

Every image is seen in exactly one batch (of one rank), so the links are a top-k over
the channels of each batch row: no merging, memory O(images x k) per layer, exact and
independent of the batch size or sharding (ties by the lower channel index).

Example::

    >>> recorder = ImageLinksRecorder(k=5)
    >>> obs = record(model, probe, consumers=[recorder])        # doctest: +SKIP
    >>> attach_links(obs, recorder.result())                     # doctest: +SKIP
    >>> obs["layer1.0.conv1"].image_links.shape                  # doctest: +SKIP
    (len(probe), 5)
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .observation import Observation
from .recording import RecordingConsumer
from .recording.topk import ranking_keys

#: links kept per image and layer by default (a few: an image's strongest neurons)
DEFAULT_LINKS = 5


class ImageLinksRecorder(RecordingConsumer):
    """Recording consumer: per layer, int32 ``[n_images, k]`` channel indices most
    responsive to each probe image (highest response first, ties by the lower channel,
    -1 where the layer has fewer than ``k`` channels or the response is NaN)."""

    passes = 1

    def __init__(self, k: int = DEFAULT_LINKS):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = int(k)
        self._links: Dict[str, torch.Tensor] = {}
        self._n_images = 0

    def begin_pass(self, pass_index: int, shapes: Dict[str, Tuple[int, int, int]], probe) -> None:
        self._n_images = len(probe)
        self._links = {}

    def update(self, pass_index: int, layer: str, fmap: torch.Tensor, response: torch.Tensor,
               indices: torch.Tensor) -> None:
        links = self._links.get(layer)
        if links is None:
            links = self._links[layer] = torch.full((self._n_images, self.k), -1, dtype=torch.int64,
                                                    device=response.device)
        channels = response.shape[1]
        take = min(self.k, channels)
        # NaN responses rank last and are dropped; ties go to the lower channel
        values = torch.nan_to_num(response.float(), nan=-torch.inf)
        order = torch.topk(ranking_keys(values), take, dim=1).indices
        valid = torch.gather(values, 1, order) > -torch.inf
        links[indices, :take] = torch.where(valid, order, torch.full_like(order, -1))

    def all_reduce(self) -> None:
        """Every image was filled by exactly one rank (others hold -1): the maximum."""
        dist = torch.distributed
        for links in self._links.values():
            dist.all_reduce(links, op=dist.ReduceOp.MAX)

    def result(self) -> Dict[str, np.ndarray]:
        return {layer: links.cpu().numpy().astype(np.int32) for layer, links in self._links.items()}


def attach_links(observation: Observation, links: Optional[Dict[str, np.ndarray]]) -> Observation:
    """Set ``image_links`` of each layer of ``observation`` from a recorder's result."""
    for layer, layer_links in (links or {}).items():
        if layer in observation.layers:
            observation.layers[layer].image_links = layer_links
    return observation
