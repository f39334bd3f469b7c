"""The unit of data every later stage consumes: per neuron, its top-k probe stimuli.

A *neuron* is one output channel of a layer, read where the next layer reads it (for a
conv: after the normalisation and activation that directly follow it).  Its response to
an image is the spatial max (or mean) of that channel's activation map (for a
transformer: over the tokens, placed on the patch grid).  An observation of one layer
at one step keeps, for every neuron, the k probe images with the highest response
(sorted, highest first), the responses and the argmax position in the activation
map, which is enough to crop example patches later without the original data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np


@dataclass
class LayerObservation:
    """Top-k stimuli of every neuron of one layer at one step.

    Attributes:
        layer: module name as in ``model.named_modules()`` (e.g. ``"layer4.1.conv2"``).
        image_ids: int32 ``[N, k]`` probe indices, highest response first.
        activations: float32 ``[N, k]`` responses (spatial max or mean).
        positions: int32 ``[N, k]`` flat argmax index ``y * W + x`` in the activation map
            (for ``reduce="mean"`` still the argmax, so patches stay meaningful).
        invalid: bool ``[N]``; True where the neuron produced NaN/Inf on some probe image
            (its row is then computed from the finite responses only, or is all -1).
        map_size: ``(H, W)`` of the layer's activation map.
        input_size: ``(H, W)`` of the probe images fed to the model.
        probe_hash: content hash of the probe set (spaces refuse other hashes).
        step: training step, or ``None`` when not tied to one.
        reduce: ``"max"`` or ``"mean"``.
        image_links: optional int32 ``[n_images, j]``: per probe image, the channels
            of this layer most responsive to it (highest first, -1 = none); recorded by
            :class:`~tb_conceptevo.image_links.ImageLinksRecorder` for ConceptEvo's
            indirect image embeddings (None when not recorded).
        hook: where the layer's units were read, ``{"module", "call", "after"}`` (see
            :class:`tb_conceptevo.recording.HookPoint`); None when unknown (logs written
            before it was recorded read the layer's own output).
    """

    layer: str
    image_ids: np.ndarray
    activations: np.ndarray
    positions: np.ndarray
    invalid: np.ndarray
    map_size: Tuple[int, int]
    input_size: Tuple[int, int]
    probe_hash: str
    step: Optional[int] = None
    reduce: str = "max"
    image_links: Optional[np.ndarray] = None
    hook: Optional[Dict] = None

    @property
    def n_neurons(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.image_ids.shape[1])

    def neuron_ids(self) -> List[str]:
        """Lucent-style ids ``"layer:channel"``."""
        return [f"{self.layer}:{c}" for c in range(self.n_neurons)]

    def patch_boxes(self, fraction: float = 0.3) -> np.ndarray:
        """``[N, k, 4]`` boxes (x0, y0, x1, y1) in input pixels around each argmax.

        A square of side ``fraction * input size`` (the ConceptEvo research code uses
        0.3), but at least two activation-map cells wide so deep layers, whose cells
        cover many pixels, show the structure they respond to; centred on the argmax
        cell's centre mapped to input pixels and clipped inside the image.
        """
        return patch_boxes(self.positions, self.map_size, self.input_size, fraction)


def patch_boxes(positions: np.ndarray, map_size, input_size, fraction: float = 0.3) -> np.ndarray:
    mh, mw = map_size
    ih, iw = input_size
    pos = np.asarray(positions)
    cy = (pos // mw + 0.5) * (ih / mh)
    cx = (pos % mw + 0.5) * (iw / mw)
    side_y = min(float(ih), max(1.0, fraction * ih, 2.0 * ih / mh))
    side_x = min(float(iw), max(1.0, fraction * iw, 2.0 * iw / mw))
    y0 = np.clip(np.round(cy - side_y / 2), 0, ih - side_y)
    x0 = np.clip(np.round(cx - side_x / 2), 0, iw - side_x)
    return np.stack([x0, y0, x0 + side_x, y0 + side_y], axis=-1).astype(np.int32)


@dataclass
class Observation:
    """Observations of several layers of one model at one step."""

    layers: Dict[str, LayerObservation] = field(default_factory=dict)
    step: Optional[int] = None
    probe_hash: str = ""

    def __getitem__(self, layer: str) -> LayerObservation:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"no observation for layer {layer!r}; have {sorted(self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def items(self):
        return self.layers.items()

    @property
    def n_neurons(self) -> int:
        return sum(o.n_neurons for o in self.layers.values())
