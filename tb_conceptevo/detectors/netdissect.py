"""Network Dissection: IoU of each neuron's top-quantile activation region with concept masks.

For neuron ``k`` and concept ``c`` (Bau et al., 2017)::

    T_k      = the activation exceeded by the top (1 - quantile) of all activations of k
               over every probe image and every position of its activation map
    M_k(x)   = bilinear_upsample(A_k(x), mask size) >= T_k          (activation mask)
    IoU_k,c  = sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|     (over the whole probe set)

Why two passes: ``T_k`` is a quantile over *all* images, so the masks ``M_k`` of the
first images can only be computed once every image has been seen.  Two ways out are
implemented, chosen per recording from the memory the activation maps need:

* **cached (one forward pass)** -- when all activation maps of the dissected layers
  fit in ``cache_bytes`` (e.g. 1,024 ConceptShapes images x 128 channels x 16 x 16 =
  134 MB), they are copied during the recording pass; thresholds and IoUs are then
  computed from the copy in ``end_pass(0)``.  ``passes`` becomes 1, so the recorder
  runs no second forward pass.
* **streaming (two passes)** -- otherwise pass 0 keeps, per neuron, its exact top-``m``
  activations, ``m = ceil((1 - quantile) * n_images * H * W)`` (memory
  ``neurons x m`` floats, e.g. 256 x 32k for 2,048 images at 56 x 56 = 33 MB): the
  threshold is then the *exact* quantile, not an estimate from histograms or a sample.
  Pass 1 accumulates intersections and unions.

In both cases the statistics of a batch are computed for all neurons x concepts at
once: one batched matmul of the thresholded activation masks ``[B, N, P]`` with the
concept masks ``[B, P, C]`` over the flattened pixels, on the model's device.

Ties: ``>= T_k`` keeps every position at the threshold (saturating units whose top
activations are all equal keep their whole active region); when ``T_k`` equals the
unit's minimum (a mostly silent ReLU unit) ``> T_k`` is used instead, so a unit never
covers the whole probe set.  Units with NaN/Inf activations get NaN rows.

Example:
    >>> from tb_conceptevo import probes, record
    >>> probe = probes.ConceptShapes(n=256, size=32)
    >>> detector = NetDissect(vocabulary=probe)          # ConceptShapes' 26 concepts
    >>> consumer = detector.consumer(probe, ["features.0"])
    >>> record(model, probe, ["features.0"], consumers=[consumer])   # doctest: +SKIP
    >>> detection = consumer.result()["features.0"]                  # doctest: +SKIP
    >>> detection.concepts[detection.top()[0][0]]                    # doctest: +SKIP
    'red'
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..probes.base import ConceptVocabulary, ProbeSet
from .base import Detection, Detector
from .vocabulary import make_vocabulary, probe_vocabulary

try:  # the protocol class lives in recording.py; fall back to a plain base if absent
    from ..recording import RecordingConsumer
except ImportError:  # pragma: no cover
    RecordingConsumer = object  # type: ignore

#: elements of one chunk of maps or masks (bounds temporary memory)
_CHUNK_ELEMENTS = 16 * 1024 * 1024
#: relative tolerance of the ``>= T`` comparison (bilinear upsampling of equal values
#: may be one float32 ulp below them)
_TIE_TOLERANCE = 1e-6


class NetDissect(Detector):
    """Network Dissection detector (IoU with the concept masks of a probe set).

    Args:
        vocabulary: the concepts to score: None (the probe set's own vocabulary, taken
            when :meth:`consumer` is called), a :class:`ProbeSet` (its vocabulary), a
            :class:`ConceptVocabulary` or a list of words; every word must be one of
            the probe set's masked concepts.
        quantile: per-neuron activation quantile giving the threshold ``T_k``
            (0.995 = top 0.5 %, as in Network Dissection).
        threshold: tau; a neuron is interpretable when its best IoU exceeds it
            (0.04 as in Network Dissection).
        cache_bytes: memory allowed for copying the activation maps so that one
            forward pass suffices (see the module docstring); 0 forces two passes.
        name: detector name used in tags.
        progress: tqdm bar for the IoU stage of the cached mode.
    """

    def __init__(self, vocabulary=None, quantile: float = 0.995, threshold: float = 0.04,
                 cache_bytes: int = 1 << 30, name: str = "netdissect", progress: bool = True):
        if not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"quantile must be in (0, 1), e.g. 0.995 for the top 0.5 %; got {quantile!r}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        from ..metadata import check_name

        self.name = check_name(name, "detector name")
        self.quantile = float(quantile)
        self.threshold = float(threshold)
        self.cache_bytes = int(cache_bytes)
        self.progress = bool(progress)
        self._vocabulary: Optional[ConceptVocabulary] = None
        if isinstance(vocabulary, ProbeSet) or (vocabulary is not None and hasattr(vocabulary, "masks")):
            self._vocabulary = probe_vocabulary(vocabulary)
        elif vocabulary is not None:
            self._vocabulary = make_vocabulary(vocabulary, what="NetDissect vocabulary")

    # -------------------------------------------------------------- vocabulary
    @property
    def vocabulary(self) -> ConceptVocabulary:
        if self._vocabulary is None:
            raise ValueError(
                "NetDissect(vocabulary=None) takes its concepts from the probe set when it is first "
                "run; pass NetDissect(vocabulary=probe) to know them before"
            )
        return self._vocabulary

    @property
    def concepts(self) -> List[str]:
        return list(self.vocabulary.names)

    @property
    def categories(self) -> List[str]:
        return list(self.vocabulary.categories)

    def config(self) -> Dict:
        """JSON-able parameters (stored in space files; see :func:`detector_from_config`)."""
        return {"kind": "netdissect", "name": self.name, "quantile": self.quantile,
                "threshold": self.threshold, "cache_bytes": self.cache_bytes,
                "concepts": list(self.vocabulary.names) if self._vocabulary is not None else None,
                "categories": list(self.vocabulary.categories) if self._vocabulary is not None else None}

    def _mask_channels(self, probe) -> Optional[torch.Tensor]:
        """Indices of this detector's concepts among the probe's mask channels (None = all, same order)."""
        if not getattr(probe, "has_masks", False):
            raise ValueError(
                f"NetDissect needs concept masks but the probe set {type(probe).__name__} has none; "
                "use probes.ConceptShapes (or a probe set with masks), or CLIPDissect for unlabelled images"
            )
        probe_vocab = probe_vocabulary(probe)
        if self._vocabulary is None:
            self._vocabulary = probe_vocab
        if tuple(self._vocabulary.names) == tuple(probe_vocab.names):
            return None
        index = {name: i for i, name in enumerate(probe_vocab.names)}
        missing = [w for w in self._vocabulary.names if w not in index]
        if missing:
            raise ValueError(
                f"NetDissect concepts {missing[:10]} have no masks in {type(probe).__name__} "
                f"(masked concepts: {list(probe_vocab.names)[:30]}); remove them from the vocabulary"
            )
        return torch.tensor([index[w] for w in self._vocabulary.names], dtype=torch.long)

    def consumer(self, probe, layers: Sequence[str]) -> "NetDissectConsumer":
        return NetDissectConsumer(self, probe, list(layers))

    def __repr__(self) -> str:
        n = len(self._vocabulary) if self._vocabulary is not None else "probe's"
        return f"NetDissect(concepts={n}, quantile={self.quantile}, threshold={self.threshold})"


class _LayerState:
    """Per-layer accumulators (all on the model's device)."""

    def __init__(self, shape: Tuple[int, int, int]):
        self.channels, self.height, self.width = shape
        self.cache: Optional[torch.Tensor] = None       # [n, N, h, w] in cached mode
        self.top: Optional[torch.Tensor] = None         # [N, <=m] in streaming mode
        self.minimum: Optional[torch.Tensor] = None     # [N] running minimum
        self.bad: Optional[torch.Tensor] = None         # [N] saw NaN/Inf
        self.thresholds: Optional[torch.Tensor] = None  # [N]
        self.strict: Optional[torch.Tensor] = None      # [N] use '>' instead of '>='
        self.passing: Optional[torch.Tensor] = None     # [N] value an upsampled pixel must reach
        self.intersection: Optional[torch.Tensor] = None  # [N, C] float64
        self.active_count: Optional[torch.Tensor] = None  # [N] float64
        self.top_m = 0
        self.any_bad = False


class NetDissectConsumer(RecordingConsumer):
    """Recording consumer of :class:`NetDissect`; ``result()`` -> ``{layer: Detection}``."""

    def __init__(self, detector: NetDissect, probe, layers: List[str]):
        self.detector = detector
        self.probe = probe
        self.layers = list(layers)
        self.mask_channels = detector._mask_channels(probe)  # validates the probe first
        self.n_concepts = len(detector.vocabulary)
        self.n_images = len(probe)
        self.passes = 2
        self.cached = False
        self.states: Dict[str, _LayerState] = {}
        self.concept_count: Optional[torch.Tensor] = None  # [C] float64 pixels per concept
        self._masks_key = None
        self._masks = None
        self._pixel_major_of = None
        self._pixel_major_masks = None
        self._done = False

    # ------------------------------------------------------------ protocol
    def begin_pass(self, pass_index: int, shapes: Dict[str, Tuple[int, int, int]], probe) -> None:
        if pass_index == 0:
            missing = [layer for layer in self.layers if layer not in shapes]
            if missing:
                raise ValueError(f"NetDissect: no activation maps for layers {missing}")
            self.states = {layer: _LayerState(tuple(shapes[layer])) for layer in self.layers}
            need = sum(4 * self.n_images * s.channels * s.height * s.width for s in self.states.values())
            self.cached = need <= self.detector.cache_bytes
            # one forward pass suffices when the maps are kept (the recorder reads
            # ``passes`` again before each pass)
            self.passes = 1 if self.cached else 2
            for state in self.states.values():
                state.top_m = max(1, math.ceil((1.0 - self.detector.quantile) * self.n_images
                                               * state.height * state.width))

    def update(self, pass_index: int, layer: str, fmap: torch.Tensor, response: torch.Tensor,
               indices: torch.Tensor) -> None:
        state = self.states.get(layer)
        if state is None:
            return
        if pass_index == 0:
            fmap = self._track_validity(state, fmap, response)
            if self.cached:
                if state.cache is None:
                    state.cache = torch.empty((self.n_images, state.channels, state.height, state.width),
                                              dtype=torch.float32, device=fmap.device)
                # copy: a following in-place op (ReLU(inplace=True)) may overwrite fmap
                state.cache[indices] = fmap
            else:
                values = fmap.transpose(0, 1).reshape(state.channels, -1)
                candidates = values if state.top is None else torch.cat([state.top, values], dim=1)
                if candidates.shape[1] > state.top_m:
                    candidates = torch.topk(candidates, state.top_m, dim=1, sorted=False).values
                state.top = candidates.contiguous()
        elif pass_index == 1 and not self.cached:
            if state.any_bad:  # their rows become NaN; keep the other neurons' arithmetic finite
                fmap = torch.nan_to_num(fmap, nan=0.0, posinf=0.0, neginf=0.0)
            self._accumulate(state, fmap, self._concept_masks(indices, fmap.device))

    def end_pass(self, pass_index: int) -> None:
        if pass_index != 0:
            return
        for state in self.states.values():
            if self.cached:
                state.thresholds = self._thresholds_from_cache(state)
            else:
                # the m-th largest activation = the exact top-(1 - quantile) threshold
                state.thresholds = state.top.min(dim=1).values
                state.top = None
            state.strict = state.thresholds <= state.minimum
            state.any_bad = bool(state.bad.any())
            # one comparison for both rules: '>' T is '>=' the next float above T; '>=' T
            # tolerates one-ulp rounding of the bilinear interpolation
            above = torch.nextafter(state.thresholds, torch.full_like(state.thresholds, math.inf))
            loose = state.thresholds - _TIE_TOLERANCE * state.thresholds.abs()
            state.passing = torch.where(state.strict, above, loose)
        if self.cached:
            self._iou_from_cache()

    def result(self) -> Dict[str, Detection]:
        detections = {}
        for layer, state in self.states.items():
            if state.intersection is None:
                raise RuntimeError("NetDissect: result() called before the recording passes ran")
            intersection = state.intersection
            union = state.active_count[:, None] + self.concept_count[None, :] - intersection
            iou = torch.where(union > 0, intersection / union.clamp(min=1.0), torch.zeros_like(union))
            iou = iou.float()
            iou[state.bad] = float("nan")
            detections[layer] = Detection(
                layer=layer, similarity=iou.cpu().numpy().astype(np.float32),
                concepts=list(self.detector.concepts), categories=list(self.detector.categories),
                threshold=self.detector.threshold,
            )
        return detections

    # ------------------------------------------------------------ internals
    @staticmethod
    def _track_validity(state: _LayerState, fmap: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        bad_now = torch.isnan(response).any(dim=0)
        state.bad = bad_now if state.bad is None else state.bad | bad_now
        # NaN responses mark every non-finite map (checked on [B, N], not [B, N, H, W])
        if bool(bad_now.any()):
            fmap = torch.nan_to_num(fmap, nan=0.0, posinf=0.0, neginf=0.0)
        batch_min = fmap.amin(dim=(0, 2, 3))
        state.minimum = batch_min if state.minimum is None else torch.minimum(state.minimum, batch_min)
        return fmap

    def _thresholds_from_cache(self, state: _LayerState) -> torch.Tensor:
        """Exact per-neuron top-m threshold from the cached maps, a few channels at a time."""
        thresholds = torch.empty(state.channels, device=state.cache.device)
        per_channel = self.n_images * state.height * state.width
        step = max(1, _CHUNK_ELEMENTS // max(1, per_channel))
        for start in range(0, state.channels, step):
            block = state.cache[:, start:start + step].transpose(0, 1).reshape(-1, per_channel)
            thresholds[start:start + step] = torch.topk(block, state.top_m, dim=1, sorted=False).values.min(dim=1).values
        return thresholds

    def _iou_from_cache(self) -> None:
        from tqdm.auto import tqdm

        device = next(iter(self.states.values())).cache.device
        height, width = self._mask_size()
        largest = max(max(s.channels * s.height * s.width for s in self.states.values()),
                      self.n_concepts * height * width)
        batch = max(1, min(256, _CHUNK_ELEMENTS // max(1, largest)))
        starts = range(0, self.n_images, batch)
        for start in tqdm(starts, desc="NetDissect IoU", leave=False, disable=not self.detector.progress):
            indices = torch.arange(start, min(self.n_images, start + batch), device=device)
            masks = self._concept_masks(indices, device)
            for state in self.states.values():
                self._accumulate(state, state.cache[indices], masks)
        for state in self.states.values():
            state.cache = None  # free the copy

    def _mask_size(self) -> Tuple[int, int]:
        masks = self._concept_masks(torch.arange(1), torch.device("cpu"))
        return int(masks.shape[-2]), int(masks.shape[-1])

    def _concept_masks(self, indices: torch.Tensor, device) -> torch.Tensor:
        """bool ``[B, C, H, W]`` masks of this detector's concepts (fetched once per batch)."""
        key = (int(indices[0]), int(indices.shape[0]), str(device)) if indices.numel() else None
        if key is not None and key == self._masks_key:
            return self._masks
        masks = torch.as_tensor(self.probe.masks(indices))
        if masks.dim() != 4 or masks.shape[0] != indices.shape[0]:
            raise ValueError(f"probe.masks() must return [B, C, H, W], got shape {tuple(masks.shape)}")
        masks = masks.to(device=device, dtype=torch.bool)
        if self.mask_channels is not None:
            masks = masks[:, self.mask_channels.to(device)]
        self._masks_key, self._masks = key, masks
        return masks

    def _accumulate(self, state: _LayerState, fmap: torch.Tensor, masks: torch.Tensor) -> None:
        """Add one batch's intersections and counts for all neurons x concepts.

        Only ~0.5 % of the upsampled pixels pass the threshold, and a bilinear pixel
        can only pass if one of the (at most) 2 x 2 cells it interpolates does.  So
        instead of upsampling every map (the cost of the whole recording pass for
        large masks), the pixels whose interpolation cells contain a cell above the
        threshold are enumerated and interpolated exactly like
        ``F.interpolate(mode="bilinear", align_corners=False)``; the intersections
        with all concepts are then one gather + ``index_add`` over those pixels.
        """
        channels, height, width = fmap.shape[1], fmap.shape[2], fmap.shape[3]
        out_h, out_w = masks.shape[-2:]
        device = fmap.device
        if state.intersection is None:
            state.intersection = torch.zeros((channels, self.n_concepts), dtype=torch.float64, device=device)
            state.active_count = torch.zeros(channels, dtype=torch.float64, device=device)
        if self.concept_count is None:
            self.concept_count = torch.zeros(self.n_concepts, dtype=torch.float64, device=device)
        if state is self.states[self.layers[0]]:  # every batch reaches every layer once
            self.concept_count += masks.sum(dim=(0, 2, 3), dtype=torch.float64)
        passing = state.passing.to(device)
        hot = fmap >= passing[None, :, None, None]                                     # [B, N, h, w]
        # anchor cell (y0, x0) of an output pixel: its cells are {y0, y0+1} x {x0, x0+1}
        anchors = hot.clone()
        anchors[..., :-1, :] |= hot[..., 1:, :]
        anchors[..., :, :-1] |= anchors[..., :, 1:].clone()
        image, neuron, cell_y, cell_x = anchors.nonzero(as_tuple=True)
        if image.numel() == 0:
            return
        ys, xs = _bilinear_table(height, out_h, device), _bilinear_table(width, out_w, device)
        # the 4 cells of each anchor, gathered once; every output pixel of the anchor's
        # block is then a dense [anchors, Ly, Lx] broadcast (no per-pixel gathers)
        flat = fmap.reshape(-1)
        base = (image * channels + neuron) * (height * width)
        top, bottom = cell_y * width, ys.next_cell[cell_y] * width
        right = xs.next_cell[cell_x]
        corners = [flat[base + r + c][:, None, None] for r in (top, bottom) for c in (cell_x, right)]
        wy = ys.block_weight[cell_y][:, :, None]                                      # [n, Ly, 1]
        wx = xs.block_weight[cell_x][:, None, :]                                      # [n, 1, Lx]
        value = (1 - wy) * ((1 - wx) * corners[0] + wx * corners[1]) + wy * ((1 - wx) * corners[2] + wx * corners[3])
        # padding entries have weight NaN, so they never pass
        anchor, block_row, block_col = (value >= passing[neuron][:, None, None]).nonzero(as_tuple=True)
        b, n = image[anchor], neuron[anchor]
        row = ys.pixels[cell_y[anchor], block_row]
        col = xs.pixels[cell_x[anchor], block_col]
        state.active_count += torch.bincount(n, minlength=channels).double()
        pixel_concepts = self._pixel_major(masks)                                      # [B*H*W, C]
        concept_at_pixel = pixel_concepts[(b * out_h + row) * out_w + col].float()     # [nnz, C]
        hits = torch.zeros((channels, self.n_concepts), dtype=torch.float32, device=device)
        hits.index_add_(0, n, concept_at_pixel)
        state.intersection += hits.double()

    def _pixel_major(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks as ``[B*H*W, C]`` rows (one per pixel), computed once per batch."""
        if self._pixel_major_of is not masks:
            self._pixel_major_of = masks
            self._pixel_major_masks = masks.permute(0, 2, 3, 1).reshape(-1, masks.shape[1])
        return self._pixel_major_masks


class _BilinearTable:
    """1-D bilinear interpolation (PyTorch, ``align_corners=False``) from ``src`` to ``dst``
    cells, per source cell ("anchor"): the output indices interpolated between it and
    the next cell (``pixels``, -1 padded), their weights of the next cell
    (``block_weight``, NaN padded) and the next cell's index (clamped at the border)."""

    def __init__(self, src: int, dst: int, device):
        scale = np.float32(src / dst)
        position = np.maximum((np.arange(dst, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                              np.float32(0.0))
        low = np.minimum(np.floor(position).astype(np.int64), src - 1)
        weight = (position - low).astype(np.float32)
        counts = np.bincount(low, minlength=src)
        pixels = np.full((src, max(1, counts.max())), -1, dtype=np.int64)
        for cell in range(src):  # at most a few hundred cells, once per (src, dst)
            members = np.nonzero(low == cell)[0]
            pixels[cell, :len(members)] = members
        block_weight = np.where(pixels >= 0, weight[np.maximum(pixels, 0)], np.nan).astype(np.float32)
        self.next_cell = torch.from_numpy(np.minimum(np.arange(src) + 1, src - 1)).to(device)
        self.block_weight = torch.from_numpy(block_weight).to(device)
        self.pixels = torch.from_numpy(pixels).to(device)


_TABLES: Dict[Tuple[int, int, str], _BilinearTable] = {}


def _bilinear_table(src: int, dst: int, device) -> _BilinearTable:
    key = (int(src), int(dst), str(device))
    if key not in _TABLES:
        _TABLES[key] = _BilinearTable(src, dst, device)
    return _TABLES[key]
