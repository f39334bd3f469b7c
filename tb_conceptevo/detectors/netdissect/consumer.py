"""The recording consumer of NetDissect: screening in the pass, exact thresholds after it,
the upsampled intersections with the masks and the chance level (see the package
docstring for the method)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..base import ChanceLevel, Detection, null_draws
from .candidates import SLOT_BYTES, SLOT_BYTES_NO_NEIGHBOURS, SLOTS_PER_M, Candidates, dense_maps, loosened
from .masks import MaskPatterns, ProbeMasks
from .upsample import CHUNK_ELEMENTS, active_pixels, bilinear_table

try:  # the protocol class lives in recording/recorder.py; fall back to a plain base if absent
    from ...recording import RecordingConsumer
except ImportError:  # pragma: no cover
    RecordingConsumer = object  # type: ignore

#: largest neurons x mask-patterns table counted with one bincount
_MAX_PATTERN_TABLE = 1 << 24


class _LayerState:
    """Per-layer state (all on the model's device)."""

    def __init__(self, shape: Tuple[int, int, int], m: int):
        self.channels, self.height, self.width = shape
        self.top_m = m
        self.wants_cells = True                         # one pass: candidates keep their cells
        self.neighbours = True                          # False when the maps are at the masks' size
        self.counted_in_pass_1 = False                  # two passes: cells found again in pass 1
        self.store: Optional[Candidates] = None
        self.bad: Optional[torch.Tensor] = None         # [N] saw NaN/Inf
        self.thresholds: Optional[torch.Tensor] = None  # [N]
        self.strict: Optional[torch.Tensor] = None      # [N] use '>' instead of '>='
        self.passing: Optional[torch.Tensor] = None     # [N] value an upsampled pixel must reach
        # row 0 of these: the counts; rows 1+: the same counts against the masks of other
        # images (image_map[d]), the draws of the chance-level null
        self.image_map: Optional[torch.Tensor] = None     # [1 + draws, n_images] int64
        self.pattern_hits: Optional[torch.Tensor] = None  # [1 + draws, N, P] int64 active pixels per mask pattern
        self.intersection: Optional[torch.Tensor] = None  # [1 + draws, N, C] float64 (many patterns only)
        self.active_count: Optional[torch.Tensor] = None  # [N] float64
        self.any_bad = False

    @property
    def one_pass(self) -> bool:
        return self.store is not None and self.store.with_cells

    def one_pass_bytes(self) -> int:
        slot = SLOT_BYTES if self.neighbours else SLOT_BYTES_NO_NEIGHBOURS
        return SLOTS_PER_M * self.top_m * self.channels * slot


class NetDissectConsumer(RecordingConsumer):
    """Recording consumer of :class:`~.detector.NetDissect`; ``result()`` -> ``{layer: Detection}``.

    The detector's ``compiled`` option chooses the CPU code (its ``cpu_kernels``); its
    caches keep the pattern table, bilinear tables and candidate arrays for the next step.
    """

    def __init__(self, detector, probe, layers: List[str]):
        self.detector = detector
        self.probe = probe
        self.layers = list(layers)
        self.mask_channels = detector.mask_channels(probe)  # validates the probe first
        self.n_concepts = len(detector.vocabulary)
        self.n_images = len(probe)
        self.masks = ProbeMasks(probe, self.mask_channels, self.n_concepts, self.n_images)
        self.kernels = detector.cpu_kernels
        self.passes = 1
        self.states: Dict[str, _LayerState] = {}
        self._patterns: Optional[MaskPatterns] = None

    # ------------------------------------------------------------ protocol
    def begin_pass(self, pass_index: int, shapes: Dict[str, Tuple[int, int, int]], probe) -> None:
        if pass_index != 0:
            return
        missing = [layer for layer in self.layers if layer not in shapes]
        if missing:
            raise ValueError(f"NetDissect: no activation maps for layers {missing}")
        self.states = {}
        mask_size = tuple(self.masks.masks(torch.arange(1), "cpu").shape[-2:])
        for layer in self.layers:
            shape = tuple(shapes[layer])
            m = max(1, math.ceil((1.0 - self.detector.quantile) * self.n_images * shape[1] * shape[2]))
            self.states[layer] = _LayerState(shape, m)
            self.states[layer].neighbours = tuple(shape[1:]) != mask_size
            self.states[layer].image_map = _null_image_maps(self.n_images, null_draws(shape[0]))
        # one pass for the layers whose candidates fit the budget, smallest first
        budget = self.detector.memory_bytes
        for state in sorted(self.states.values(), key=_LayerState.one_pass_bytes):
            state.wants_cells = state.one_pass_bytes() <= budget
            budget -= state.one_pass_bytes() if state.wants_cells else 0
        self.passes = 1 if all(s.wants_cells for s in self.states.values()) else 2

    def update(self, pass_index: int, layer: str, fmap: torch.Tensor, response: torch.Tensor,
               indices: torch.Tensor) -> None:
        state = self.states.get(layer)
        if state is None:
            return
        if pass_index == 0:
            self._screen(state, fmap, response, indices)
        elif pass_index == 1 and state.counted_in_pass_1:
            if state.any_bad:  # their rows become NaN; keep the other neurons' arithmetic finite
                fmap = torch.nan_to_num(fmap, nan=0.0, posinf=0.0, neginf=0.0)
            batch_cells = self._store(state, True, fmap.device)
            batch_cells.screen(dense_maps(fmap, self.kernels), indices.to(fmap.device), low=state.passing)
            self._count_candidates(state, batch_cells)

    def end_pass(self, pass_index: int) -> None:
        if pass_index != 0:
            return
        from tqdm.auto import tqdm

        for state in tqdm(list(self.states.values()), desc="NetDissect IoU", leave=False,
                          disable=not self.detector.progress):
            self._set_thresholds(state)
            if state.one_pass:
                self._count_candidates(state, state.store)
            else:
                state.counted_in_pass_1 = True
            state.store.release()  # the next logged step reuses the memory
            state.store = None
        # the recorder reads ``passes`` again after every pass
        self.passes = 2 if any(s.counted_in_pass_1 for s in self.states.values()) else 1

    def all_reduce(self) -> None:
        """Sum every rank's counts (thresholds were merged at the end of pass 0)."""
        dist = torch.distributed
        for state in self.states.values():
            for name in ("pattern_hits", "intersection", "active_count"):
                tensor = getattr(state, name)
                if tensor is not None:
                    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def result(self) -> Dict[str, Detection]:
        detections = {}
        for layer, state in self.states.items():
            if state.active_count is None:
                raise RuntimeError("NetDissect: result() called before the recording passes ran")
            patterns = self._patterns
            if state.pattern_hits is not None:
                intersection = state.pattern_hits.double() @ patterns.bits.to(state.pattern_hits.device)
            else:
                intersection = state.intersection                                   # [1 + draws, N, C]
            concept_count = patterns.concept_count.to(intersection.device)
            # a permutation of the images keeps every concept's pixel count: same unions
            union = state.active_count[None, :, None] + concept_count[None, None, :] - intersection
            iou = torch.where(union > 0, intersection / union.clamp(min=1.0), torch.zeros_like(union))
            iou = iou.float()
            iou[:, state.bad] = float("nan")
            iou = iou.cpu().numpy().astype(np.float32)
            chance = ChanceLevel()
            for draw in iou[1:]:
                chance.add(draw)
            detections[layer] = Detection(
                layer=layer, similarity=iou[0], concepts=list(self.detector.concepts),
                categories=list(self.detector.categories), threshold=self.detector.threshold,
                null_similarity=chance.levels(),
            )
        return detections

    # ------------------------------------------------------------ pass 0: screening
    def _screen(self, state: _LayerState, fmap: torch.Tensor, response: torch.Tensor,
                indices: torch.Tensor) -> None:
        """Track validity; add the batch's cells at or above the running bound."""
        bad_now = torch.isnan(response).any(dim=0)
        state.bad = bad_now if state.bad is None else state.bad | bad_now
        # NaN responses mark every non-finite map (checked on [B, N], not [B, N, H, W])
        if bool(bad_now.any()):
            fmap = torch.nan_to_num(fmap, nan=0.0, posinf=0.0, neginf=0.0)
        fmap = dense_maps(fmap, self.kernels)
        batch, channels, height, width = fmap.shape
        store = state.store
        if store is None:  # created here: the device is the model's
            store = state.store = self._store(state, state.wants_cells, fmap.device)
        store.screen(fmap, indices.to(fmap.device))
        if store.with_cells and (sum(s.store.nbytes for s in self.states.values() if s.one_pass)
                                 > self.detector.memory_bytes):
            # massive ties at the threshold: keep values only, find the cells in pass 1
            store.drop_cells()

    # ------------------------------------------------------------ thresholds
    def _set_thresholds(self, state: _LayerState) -> None:
        """Exact thresholds from the candidates (merged across ranks under torch.distributed)."""
        store = state.store
        distributed = _world_size() > 1
        if distributed:
            top = store.top_values()                                       # [N, m]
            gathered = [torch.empty_like(top) for _ in range(_world_size())]
            torch.distributed.all_gather(gathered, top.contiguous())
            state.thresholds = torch.topk(torch.cat(gathered, dim=1), state.top_m, dim=1, sorted=False
                                          ).values.amin(dim=1)
        else:
            state.thresholds = store.kth_largest()
        # the threshold is the unit's minimum iff no cell anywhere lies below it
        filled = torch.arange(store.values.shape[1], device=store.values.device)[None, :] < store.count[:, None]
        below = store.below | ((store.values < state.thresholds[:, None]) & filled).any(dim=1)
        flags = torch.stack([below, state.bad]).to(torch.uint8)
        if distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        state.strict, state.bad = flags[0] == 0, flags[1].bool()
        state.passing = _passing_values(state.thresholds, state.strict)
        state.any_bad = bool(state.bad.any())

    # ------------------------------------------------------------ intersections
    def _count_candidates(self, state: _LayerState, store: Candidates) -> None:
        """Count the active upsampled pixels of the candidates that pass their threshold."""
        patterns = self._mask_patterns(store.values.device)
        self._prepare_counts(state, patterns, store.values.device)
        kernels = store.kernels
        if kernels is not None and state.pattern_hits is not None:
            tables = self.detector.bilinear_tables
            ys = bilinear_table(tables, state.height, patterns.height, "cpu")
            xs = bilinear_table(tables, state.width, patterns.width, "cpu")
            active = torch.zeros(state.channels, dtype=torch.int64)
            kernels.count_pixels(store.values.numpy(), store.cells.numpy(), store.around.numpy(),
                                 store.count.numpy(), state.passing.float().contiguous().numpy(),
                                 state.height, state.width, ys.block_weight.numpy(), ys.pixels.numpy(),
                                 xs.block_weight.numpy(), xs.pixels.numpy(), patterns.height, patterns.width,
                                 patterns.pixel_pattern.numpy(), state.image_map.numpy(), state.pattern_hits.numpy(),
                                 active.numpy())
            state.active_count += active.double()
            return
        cells_per_map = state.height * state.width
        neuron, slot = store.hot(state.passing)
        flat = neuron * store.values.shape[1] + slot
        key = store.cells.view(-1).index_select(0, flat)
        image = torch.div(key, cells_per_map, rounding_mode="floor")
        within = key - image * cells_per_map
        y, x = torch.div(within, state.width, rounding_mode="floor"), within % state.width
        self._count(state, neuron, image, y, x, store.values.view(-1).index_select(0, flat),
                    store.around_rows().index_select(0, flat))

    def _prepare_counts(self, state: _LayerState, patterns: "MaskPatterns", device) -> None:
        if state.active_count is not None:
            return
        channels, tables = state.channels, state.image_map.shape[0]
        state.image_map = state.image_map.to(device)
        state.active_count = torch.zeros(channels, dtype=torch.float64, device=device)
        if tables * channels * patterns.n_patterns <= _MAX_PATTERN_TABLE:
            state.pattern_hits = torch.zeros((tables, channels, patterns.n_patterns), dtype=torch.int64,
                                             device=device)
        else:
            state.intersection = torch.zeros((tables, channels, self.n_concepts), dtype=torch.float64,
                                             device=device)

    def _count(self, state: _LayerState, neuron: torch.Tensor, image: torch.Tensor, y: torch.Tensor,
               x: torch.Tensor, value: torch.Tensor, around: torch.Tensor) -> None:
        """Add the upsampled pixels of these passing cells to ``hits[neuron, pattern]``.

        ``image`` is the probe index, ``around`` the cells' 8 neighbour values.  Only
        the upsampled pixels around passing cells are evaluated (:mod:`.upsample`).  (The
        compiled CPU path, ``_kernels.count_pixels``, does the same in one loop.)
        """
        device = value.device
        patterns = self._mask_patterns(device)
        channels = state.channels
        out_h, out_w = patterns.height, patterns.width
        if (state.height, state.width) == (out_h, out_w):
            # bilinear resampling to the same size is the identity: passing cells = active pixels
            parts = [(image, neuron, y * out_w + x)]
        else:
            parts = active_pixels(state.passing, neuron, image, y, x, value, around, (state.height, state.width),
                                  (out_h, out_w), self.detector.bilinear_tables)
        pixel_pattern = patterns.pixel_pattern.to(device)
        for image, neuron, pixel in parts:
            state.active_count += torch.bincount(neuron, minlength=channels).double()
            for table, image_map in enumerate(state.image_map):  # the counts, then the null's
                pattern = pixel_pattern[image_map[image] * (out_h * out_w) + pixel]
                if state.pattern_hits is not None:
                    state.pattern_hits[table] += torch.bincount(neuron * patterns.n_patterns + pattern,
                                                                minlength=channels * patterns.n_patterns
                                                                ).view(channels, patterns.n_patterns)
                else:  # too many patterns for a table: add each pixel's concept row
                    bits = patterns.bits.to(device)
                    step = max(1, CHUNK_ELEMENTS // max(1, self.n_concepts))
                    for start in range(0, neuron.numel(), step):
                        state.intersection[table].index_add_(0, neuron[start:start + step],
                                                             bits[pattern[start:start + step]])

    # ------------------------------------------------------------ detector-owned state
    def _store(self, state: _LayerState, with_cells: bool, device) -> Candidates:
        return Candidates(state.channels, state.top_m, with_cells, device, state.neighbours,
                           kernels=self.kernels, buffers=self.detector.buffers)

    def _mask_patterns(self, device) -> MaskPatterns:
        """Pattern ids of every mask pixel of the probe set (built once per probe set and
        detector: the detector keeps the last one for its next step)."""
        if self._patterns is None:
            self._patterns = self.detector.pattern_tables.get(
                self.masks.cache_key(device), lambda: self.masks.patterns(device, self.kernels))
        return self._patterns


def _null_image_maps(n_images: int, draws: int) -> torch.Tensor:
    """int64 ``[1 + draws, n_images]``: row 0 the identity, then ``draws`` random
    permutations of the images without fixed points (each image is paired with the
    masks of another one), seeded: the same on every rank and at every step.

    The chance-level null of NetDissect: a neuron's active pixels on image ``x``
    against the concept masks of image ``perm[x]``.  It keeps the neuron's active
    region (size and place) and every concept's masks, and breaks only which image
    they belong to, so a unit that fires on the left half of every image reaches the
    IoU of "left" by chance, not by detecting it."""
    generator = torch.Generator().manual_seed(0)
    maps = [torch.arange(n_images)]
    for _ in range(draws):
        order = torch.randperm(n_images, generator=generator)
        cycle = torch.empty(n_images, dtype=torch.int64)
        cycle[order] = order.roll(-1)  # one cycle through a random order: no fixed point
        maps.append(cycle)
    return torch.stack(maps)


def _passing_values(thresholds: torch.Tensor, strict: torch.Tensor) -> torch.Tensor:
    """The value an upsampled pixel must reach: one comparison for both rules.

    ``> T`` is ``>=`` the next float above T; ``>= T`` tolerates one-ulp rounding of
    the bilinear interpolation.
    """
    above = torch.nextafter(thresholds, torch.full_like(thresholds, math.inf))
    return torch.where(strict, above, loosened(thresholds))


def _world_size() -> int:
    from ...recording import rank_and_world

    return rank_and_world()[1]
