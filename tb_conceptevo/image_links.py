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

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .observation import Observation
from .recording import RecordingConsumer
from .recording import _kernels
from .recording import responses as recording_responses
from .recording.topk import ranking_keys

#: links kept per image and layer by default (a few: an image's strongest neurons)
DEFAULT_LINKS = 5


class ImageLinksRecorder(RecordingConsumer):
    """Recording consumer: per layer, int32 ``[n_images, k]`` channel indices most
    responsive to each probe image (highest response first, ties by the lower channel,
    -1 where the layer has fewer than ``k`` channels or the response is NaN).

    It reads only the responses (``update_batch``), once per batch for all layers: on a
    CPU as one compiled loop, elsewhere as one ``topk`` per channel count (layers of
    equal width side by side), so a net of many small layers costs little per layer.
    """

    passes = 1

    def __init__(self, k: int = DEFAULT_LINKS):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = int(k)
        self._layers: List[str] = []
        self._links: Optional[torch.Tensor] = None   # [n_images, layers, k]
        self._n_images = 0

    def begin_pass(self, pass_index: int, shapes: Dict[str, Tuple[int, int, int]], probe) -> None:
        self._n_images = len(probe)
        self._layers, self._links = [], None

    def update_batch(self, pass_index: int, responses: torch.Tensor, columns: Dict[str, slice],
                     indices: torch.Tensor) -> None:
        if self._links is None:
            self._start(columns, responses.device)
        if recording_responses._compiled_loops(responses.device):

            _kernels.segment_topk(responses.float().numpy(), self._starts, self._widths, indices.numpy(),
                                  self._links.numpy())
            return
        # NaN responses rank last and are dropped; ties go to the lower channel (keys
        # rank by value, then column: no sync, as suits an accelerator)
        keys = ranking_keys(torch.nan_to_num(responses.float(), nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf))
        for width, layer_index, cols in self._groups:
            take = min(self.k, width)
            grouped = keys.index_select(1, cols).view(keys.shape[0], len(layer_index), width)
            top = torch.topk(grouped, take, dim=2)
            self._links[indices[:, None], layer_index[None, :], :take] = torch.where(
                (top.values >> 32) > _MINUS_INF_KEY, top.indices, torch.full_like(top.indices, -1))

    def _start(self, columns: Dict[str, slice], device) -> None:
        self._layers = list(columns)
        self._links = torch.full((self._n_images, len(self._layers), self.k), -1, dtype=torch.int64, device=device)
        self._starts = np.array([columns[n].start for n in self._layers], dtype=np.int64)
        self._widths = np.array([columns[n].stop - columns[n].start for n in self._layers], dtype=np.int64)
        by_width: Dict[int, List[int]] = {}
        for i, width in enumerate(self._widths.tolist()):
            by_width.setdefault(width, []).append(i)
        self._groups = [(width, torch.tensor(members, device=device),
                         torch.cat([torch.arange(self._starts[i], self._starts[i] + width) for i in members]).to(device))
                        for width, members in by_width.items()]

    def all_reduce(self) -> None:
        """Every image was filled by exactly one rank (others hold -1): the maximum."""
        if self._links is not None:
            torch.distributed.all_reduce(self._links, op=torch.distributed.ReduceOp.MAX)

    def result(self) -> Dict[str, np.ndarray]:
        if self._links is None:
            return {}
        links = self._links.cpu().numpy().astype(np.int32)
        return {layer: np.ascontiguousarray(links[:, i]) for i, layer in enumerate(self._layers)}


#: a ranking key's upper 32 bits at -inf: keys above it belong to real responses
_MINUS_INF_KEY = int(ranking_keys(torch.tensor([[-float("inf")]]))[0, 0]) >> 32


def attach_links(observation: Observation, links: Optional[Dict[str, np.ndarray]]) -> Observation:
    """Set ``image_links`` of each layer of ``observation`` from a recorder's result."""
    for layer, layer_links in (links or {}).items():
        if layer in observation.layers:
            observation.layers[layer].image_links = layer_links
    return observation
