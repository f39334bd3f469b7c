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
#: activations per neuron in the subsample that bounds the thresholds from below
_SAMPLE_PER_NEURON = 1 << 16
#: largest neurons x mask-patterns table counted with one bincount
_MAX_PATTERN_TABLE = 1 << 24
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

    #: IoU scores span ~0-0.3, so the text space needs a sharper softmax than the
    #: paper's 0.1 (which was set for soft-WPMI scores) to tell concepts apart.
    default_temperature = 0.02

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
        self.minimum: Optional[torch.Tensor] = None     # [N] running minimum (streaming mode)
        self.bad: Optional[torch.Tensor] = None         # [N] saw NaN/Inf
        self.thresholds: Optional[torch.Tensor] = None  # [N]
        self.strict: Optional[torch.Tensor] = None      # [N] use '>' instead of '>='
        self.passing: Optional[torch.Tensor] = None     # [N] value an upsampled pixel must reach
        self.pattern_hits: Optional[torch.Tensor] = None  # [N, P] int64 active pixels per mask pattern
        self.intersection: Optional[torch.Tensor] = None  # [N, C] float64 (many patterns only)
        self.active_count: Optional[torch.Tensor] = None  # [N] float64
        self.top_m = 0
        self.any_bad = False


class _MaskPatterns:
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


#: one entry: the pattern table of the last probe set (re-dissecting the same probe set
#: at every logged step must not re-read its masks)
_PATTERN_CACHE: Dict[tuple, _MaskPatterns] = {}
#: concepts per int64 code word (bit 63 stays free so codes are non-negative)
_BITS_PER_WORD = 62


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
        self._patterns: Optional[_MaskPatterns] = None

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
            fmap = self._track_validity(state, fmap, response, track_minimum=not self.cached)
            if self.cached:
                if state.cache is None:
                    state.cache = torch.empty((self.n_images, state.channels, state.height, state.width),
                                              dtype=torch.float32, device=fmap.device)
                # copy: a following in-place op (ReLU(inplace=True)) may overwrite fmap;
                # batches come in ascending order, usually consecutive -> a slice copy
                first, count = int(indices[0]), int(indices.shape[0])
                if count and int(indices[-1]) - first + 1 == count:
                    state.cache[first:first + count].copy_(fmap)
                else:
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
            fmap = fmap.contiguous()
            hot = (fmap >= state.passing[None, :, None, None]).view(-1).nonzero().squeeze(1)
            self._accumulate(state, fmap, hot, image_ids=indices)

    def end_pass(self, pass_index: int) -> None:
        if pass_index != 0:
            return
        if self.cached:
            from tqdm.auto import tqdm

            for state in tqdm(list(self.states.values()), desc="NetDissect IoU", leave=False,
                              disable=not self.detector.progress):
                hot = self._thresholds_and_hot_cells(state)
                self._accumulate(state, state.cache, hot, image_ids=None)
                state.cache = None  # free the copy
            return
        for state in self.states.values():
            # the m-th largest activation = the exact top-(1 - quantile) threshold
            state.thresholds = state.top.min(dim=1).values
            state.top = None
            state.strict = state.thresholds <= state.minimum
            state.passing = _passing_values(state.thresholds, state.strict)
            state.any_bad = bool(state.bad.any())

    def result(self) -> Dict[str, Detection]:
        detections = {}
        for layer, state in self.states.items():
            if state.active_count is None:
                raise RuntimeError("NetDissect: result() called before the recording passes ran")
            patterns = self._patterns
            if state.pattern_hits is not None:
                intersection = state.pattern_hits.double() @ patterns.bits.to(state.pattern_hits.device)
            else:
                intersection = state.intersection
            concept_count = patterns.concept_count.to(intersection.device)
            union = state.active_count[:, None] + concept_count[None, :] - intersection
            iou = torch.where(union > 0, intersection / union.clamp(min=1.0), torch.zeros_like(union))
            iou = iou.float()
            iou[state.bad] = float("nan")
            detections[layer] = Detection(
                layer=layer, similarity=iou.cpu().numpy().astype(np.float32),
                concepts=list(self.detector.concepts), categories=list(self.detector.categories),
                threshold=self.detector.threshold,
            )
        return detections

    # ------------------------------------------------------------ thresholds
    @staticmethod
    def _track_validity(state: _LayerState, fmap: torch.Tensor, response: torch.Tensor,
                        track_minimum: bool) -> torch.Tensor:
        bad_now = torch.isnan(response).any(dim=0)
        state.bad = bad_now if state.bad is None else state.bad | bad_now
        # NaN responses mark every non-finite map (checked on [B, N], not [B, N, H, W])
        if bool(bad_now.any()):
            fmap = torch.nan_to_num(fmap, nan=0.0, posinf=0.0, neginf=0.0)
        if track_minimum:  # the cached mode finds the few minima it needs in its copy
            batch_min = fmap.amin(dim=(0, 2, 3))
            state.minimum = batch_min if state.minimum is None else torch.minimum(state.minimum, batch_min)
        return fmap

    def _thresholds_and_hot_cells(self, state: _LayerState) -> torch.Tensor:
        """Exact thresholds of the cached layer; returns its hot cells (flat cache indices).

        Selection without sorting all ``n * H * W`` activations of each neuron:

        1. a lower bound ``L_k`` below ``T_k``: the value exceeded by about twice the
           expected top share in a strided subsample of the images;
        2. one pass over the copy collects every cell ``> L_k`` (about ``2 m`` per neuron);
        3. if a neuron has at least ``m`` of them, ``T_k`` is the ``m``-th largest among
           them (exact, one sort of all candidates) and its hot cells are among them;
           if it has fewer and ``L_k`` is its minimum, ``T_k`` is that minimum (a mostly
           silent unit, strict rule) and the candidates are its hot cells.
        4. any other neuron (unrepresentative subsample) gets an exact top-``m`` of its
           own maps -- slower, same result.
        """
        cache = state.cache
        n_images, channels, height, width = cache.shape
        cells_per_map = height * width
        m = state.top_m
        lower = self._sample_lower_bounds(state)

        per_image = channels * cells_per_map
        step = max(1, _CHUNK_ELEMENTS // per_image)
        flat_values = cache.view(-1)
        candidates = torch.cat([
            _cells_above(cache[start:start + step], lower) + start * per_image
            for start in range(0, n_images, step)
        ])
        values = flat_values[candidates]
        neuron = torch.div(candidates, cells_per_map, rounding_mode="floor") % channels
        count = torch.bincount(neuron, minlength=channels)

        # the m-th largest candidate of each neuron: sort by (neuron, value) once
        key = neuron * (1 << 32) + _order_preserving_int(values)
        sorted_values = values[torch.argsort(key)]
        end = torch.cumsum(count, 0)
        position = (end - m).clamp(min=0, max=max(0, values.numel() - 1))
        enough = count >= m
        thresholds = lower.clone()
        if values.numel():
            thresholds = torch.where(enough, sorted_values[position], lower)
        strict = ~enough
        passing = _passing_values(thresholds, strict)
        # candidates (> L_k) contain the hot cells (>= passing) only if passing > L_k
        resolved = enough & (passing > lower)
        unresolved = (~resolved).nonzero().squeeze(1)
        if unresolved.numel():
            minimum = cache.index_select(1, unresolved).amin(dim=(0, 2, 3))
            silent = ~enough[unresolved] & (minimum == lower[unresolved])
            resolved[unresolved[silent]] = True
            fallback = unresolved[~silent]
        else:
            fallback = unresolved
        keep = resolved[neuron] & (values >= passing[neuron])
        hot = [candidates[keep]]
        if fallback.numel():
            exact, exact_hot = self._exact_thresholds(state, fallback)
            thresholds[fallback] = exact
            strict[fallback] = exact <= minimum[~silent]
            passing[fallback] = _passing_values(thresholds[fallback], strict[fallback])
            hot.append(exact_hot(passing[fallback]))
        state.thresholds, state.strict, state.passing = thresholds, strict, passing
        state.any_bad = bool(state.bad.any())
        return torch.cat(hot)

    def _sample_lower_bounds(self, state: _LayerState) -> torch.Tensor:
        """Per neuron, the activation exceeded by ~2x the top share of a strided image subsample."""
        cache = state.cache
        n_images, channels, height, width = cache.shape
        stride = max(1, n_images // max(1, _SAMPLE_PER_NEURON // (height * width)))
        sample = cache[::stride].transpose(0, 1).reshape(channels, -1)
        expected_top = (1.0 - self.detector.quantile) * sample.shape[1]
        rank = min(sample.shape[1], math.ceil(2.0 * expected_top) + 16)
        return torch.topk(sample, rank, dim=1, sorted=False).values.amin(dim=1)

    def _exact_thresholds(self, state: _LayerState, neurons: torch.Tensor):
        """Exact top-m thresholds of a few neurons, and a function giving their hot cells."""
        maps = state.cache.index_select(1, neurons)                       # [n, F, h, w]
        flat = maps.transpose(0, 1).reshape(neurons.numel(), -1)
        thresholds = torch.topk(flat, state.top_m, dim=1, sorted=False).values.amin(dim=1)

        def hot_cells(passing: torch.Tensor) -> torch.Tensor:
            image, which, cell = (maps >= passing[None, :, None, None]).view(
                maps.shape[0], neurons.numel(), -1).nonzero(as_tuple=True)
            cells_per_map = state.height * state.width
            return (image * state.channels + neurons[which]) * cells_per_map + cell

        return thresholds, hot_cells

    # ------------------------------------------------------------ intersections
    def _accumulate(self, state: _LayerState, maps: torch.Tensor, hot: torch.Tensor,
                    image_ids: Optional[torch.Tensor]) -> None:
        """Count the active upsampled pixels of the hot cells ``hot`` (flat indices of ``maps``).

        Only ~0.5 % of the upsampled pixels pass the threshold, and a bilinear pixel
        can only pass if one of the (at most) 2 x 2 cells it interpolates is hot.  So
        instead of upsampling every map, the blocks of output pixels interpolated
        between 2 x 2 cells containing a hot cell are evaluated exactly like
        ``F.interpolate(mode="bilinear", align_corners=False)``; each passing pixel adds
        one to ``hits[neuron, pattern of the mask pixel]``.
        """
        patterns = self._mask_patterns(maps.device)
        channels, height, width = state.channels, state.height, state.width
        out_h, out_w = patterns.height, patterns.width
        device = maps.device
        if state.active_count is None:
            state.active_count = torch.zeros(channels, dtype=torch.float64, device=device)
            if channels * patterns.n_patterns <= _MAX_PATTERN_TABLE:
                state.pattern_hits = torch.zeros((channels, patterns.n_patterns), dtype=torch.int64, device=device)
            else:
                state.intersection = torch.zeros((channels, self.n_concepts), dtype=torch.float64, device=device)
        cells_per_map = height * width
        image = torch.div(hot, channels * cells_per_map, rounding_mode="floor")
        neuron = torch.div(hot, cells_per_map, rounding_mode="floor") % channels
        cell = hot % cells_per_map
        if (height, width) == (out_h, out_w):
            # bilinear resampling to the same size is the identity: hot cells = active pixels
            pixel_parts = [(image, neuron, cell)]
        else:
            pixel_parts = self._active_pixels(state, maps, image, neuron, cell, (out_h, out_w))
        for image, neuron, pixel in pixel_parts:
            global_image = image if image_ids is None else image_ids.to(device)[image]
            pattern = patterns.pixel_pattern.to(device)[global_image * (out_h * out_w) + pixel]
            state.active_count += torch.bincount(neuron, minlength=channels).double()
            if state.pattern_hits is not None:
                state.pattern_hits += torch.bincount(neuron * patterns.n_patterns + pattern,
                                                     minlength=channels * patterns.n_patterns
                                                     ).view(channels, patterns.n_patterns)
            else:  # too many patterns for a table: add each pixel's concept row
                bits = patterns.bits.to(device)
                step = max(1, _CHUNK_ELEMENTS // max(1, self.n_concepts))
                for start in range(0, neuron.numel(), step):
                    state.intersection.index_add_(0, neuron[start:start + step],
                                                  bits[pattern[start:start + step]])

    def _active_pixels(self, state: _LayerState, maps: torch.Tensor, image, neuron, cell,
                       out_size: Tuple[int, int]):
        """(image, neuron, pixel) of the upsampled pixels passing the threshold, in chunks."""
        channels, height, width = state.channels, state.height, state.width
        out_h, out_w = out_size
        device = maps.device
        cell_y, cell_x = torch.div(cell, width, rounding_mode="floor"), cell % width
        # anchor (y0, x0) of a block: its cells are {y0, y0+1} x {x0, x0+1}; a hot cell
        # is a corner of the anchors (y, x), (y-1, x), (y, x-1), (y-1, x-1)
        map_index = image * channels + neuron
        anchors = torch.cat([
            (map_index * height + (cell_y - dy).clamp(min=0)) * width + (cell_x - dx).clamp(min=0)
            for dy in (0, 1) for dx in (0, 1)
        ])
        anchors = torch.unique(anchors)
        ys, xs = _bilinear_table(height, out_h, device), _bilinear_table(width, out_w, device)
        block = ys.block_weight.shape[1] * xs.block_weight.shape[1]
        step = max(1, _CHUNK_ELEMENTS // (4 * block))
        flat = maps.reshape(-1)
        passing = state.passing.to(device)
        parts = []
        for start in range(0, anchors.numel(), step):
            anchor_cells = anchors[start:start + step]
            anchor_map = torch.div(anchor_cells, height * width, rounding_mode="floor")
            within = anchor_cells % (height * width)
            y0, x0 = torch.div(within, width, rounding_mode="floor"), within % width
            base = anchor_map * (height * width)
            top, bottom = y0 * width, ys.next_cell[y0] * width
            right = xs.next_cell[x0]
            corners = [flat[base + r + c][:, None, None] for r in (top, bottom) for c in (x0, right)]
            wy = ys.block_weight[y0][:, :, None]                                      # [a, Ly, 1]
            wx = xs.block_weight[x0][:, None, :]                                      # [a, 1, Lx]
            value = ((1 - wy) * ((1 - wx) * corners[0] + wx * corners[1])
                     + wy * ((1 - wx) * corners[2] + wx * corners[3]))
            a_neuron = anchor_map % channels
            # padding entries have weight NaN, so they never pass
            which, block_row, block_col = (value >= passing[a_neuron][:, None, None]).nonzero(as_tuple=True)
            row = ys.pixels[y0[which], block_row]
            col = xs.pixels[x0[which], block_col]
            parts.append((torch.div(anchor_map[which], channels, rounding_mode="floor"),
                          a_neuron[which], row * out_w + col))
        return parts

    # ------------------------------------------------------------ masks
    def _mask_patterns(self, device) -> _MaskPatterns:
        """Pattern ids of every mask pixel of the probe set (computed once per probe set)."""
        if self._patterns is not None:
            return self._patterns
        channels = None if self.mask_channels is None else tuple(self.mask_channels.tolist())
        key = (type(self.probe).__name__, str(getattr(self.probe, "hash", id(self.probe))),
               self.n_images, channels, str(device))
        if key not in _PATTERN_CACHE:
            _PATTERN_CACHE.clear()  # one probe set at a time: bounded memory
            _PATTERN_CACHE[key] = self._build_patterns(device)
        self._patterns = _PATTERN_CACHE[key]
        return self._patterns

    def _build_patterns(self, device) -> _MaskPatterns:
        first = self._concept_masks(torch.arange(1), device)
        height, width = int(first.shape[-2]), int(first.shape[-1])
        n_words = max(1, math.ceil(self.n_concepts / _BITS_PER_WORD))
        # int64 temporaries of [b, min(C, 62), H, W] (> 31 concepts): a quarter chunk
        step = max(1, _CHUNK_ELEMENTS // (4 * min(self.n_concepts, _BITS_PER_WORD) * height * width))
        words = []
        for start in range(0, self.n_images, step):
            masks = self._concept_masks(torch.arange(start, min(self.n_images, start + step)), device)
            words.append(_pack_bits(masks))                        # [b*H*W, words]
        words = torch.cat(words)
        shifts = torch.arange(_BITS_PER_WORD, device=device)
        if n_words == 1:
            # up to 62 concepts: the code word is the pattern; its sorted distinct
            # values give the ids and the bits (one sort, no representative search)
            codes, pattern = torch.unique(words[:, 0], return_inverse=True)
            pixel_count = torch.bincount(pattern, minlength=codes.numel())
            bits = ((codes.long()[:, None] >> shifts) & 1)[:, :self.n_concepts]
            return _MaskPatterns(pattern, bits.double(), pixel_count, (height, width))
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
        return _MaskPatterns(pattern, bits.double(), pixel_count, (height, width))

    def _concept_masks(self, indices: torch.Tensor, device) -> torch.Tensor:
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


def _cells_above(maps: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Ascending flat indices of the cells of ``maps [n, N, h, w]`` above ``lower[N]``.

    Same result as ``(maps > lower).view(-1).nonzero()``, but only ~1 % of the cells
    pass and they cluster, so the (slow, serial) nonzero runs on the map rows whose
    maximum passes; a row maximum is a cheap vectorised reduction.
    """
    n, channels, height, width = maps.shape
    rows = maps.reshape(-1, width)
    live = (rows.amax(dim=1).view(n, channels, height) > lower[None, :, None]).view(-1).nonzero().squeeze(1)
    live_neuron = torch.div(live, height, rounding_mode="floor") % channels
    row, col = (rows[live] > lower[live_neuron][:, None]).nonzero(as_tuple=True)
    return live[row] * width + col


def _order_preserving_int(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in ``[0, 2**32)`` with the same order (no NaN)."""
    bits = values.contiguous().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _passing_values(thresholds: torch.Tensor, strict: torch.Tensor) -> torch.Tensor:
    """The value an upsampled pixel must reach: one comparison for both rules.

    ``> T`` is ``>=`` the next float above T; ``>= T`` tolerates one-ulp rounding of
    the bilinear interpolation.
    """
    above = torch.nextafter(thresholds, torch.full_like(thresholds, math.inf))
    loose = thresholds - _TIE_TOLERANCE * thresholds.abs()
    return torch.where(strict, above, loose)


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
