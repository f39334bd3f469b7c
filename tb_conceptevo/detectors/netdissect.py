"""Network Dissection: IoU of each neuron's top-quantile activation region with concept masks.

For neuron ``k`` and concept ``c`` (Bau et al., 2017)::

    T_k      = the activation exceeded by the top (1 - quantile) of all activations of k
               over every probe image and every position of its activation map
    M_k(x)   = bilinear_upsample(A_k(x), mask size) >= T_k          (activation mask)
    IoU_k,c  = sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|     (over the whole probe set)

``T_k`` is a quantile over *all* images, so the masks ``M_k`` of the first images can
only be known once every image has been seen.  This is done in the recording pass
itself, without keeping the activation maps:

* **one pass (default)** -- each neuron keeps its *candidates*: every cell that can
  still be among its top ``m = ceil((1 - quantile) * n_images * H * W)`` activations,
  i.e. every cell at or above a running lower bound ``R_k`` (the ``m``-th largest
  activation seen so far, which can only rise towards ``T_k``).  With each candidate go
  its 8 neighbours' activations, which is all bilinear upsampling needs around a cell
  that passes.  After the pass, ``T_k`` is the exact ``m``-th largest candidate and
  the IoUs follow from the candidates alone.  Memory: about ``3 m`` slots of 44 bytes
  per neuron (12 for maps at the masks' size, which need no neighbours), never the maps
  themselves: 92 MiB for 1,024 ConceptShapes images at 64 px and 32-64-128-128 channels,
  whose maps take 928 MiB.
* **two passes** -- when those candidates would exceed ``memory_bytes`` (large probe
  sets, huge maps, or massive ties at the threshold), a layer keeps only candidate
  *values* (at most ``m + batch`` per neuron) to find ``T_k`` exactly in pass 0, and
  pass 1 finds the cells that pass in the maps again.  ``passes`` tells the recorder.

Why the running bound: sorting every activation (the first version of this detector)
or copying all maps to select from them later (the second) cost 4x and 3x the
recording pass; with the bound each batch is read once and only ~0.5 % of it is kept.
The bound starts from a sample of the first batch (verified by counting, exact
fallback) and rises after every batch.  On CPU the screening and counting run as
compiled loops (``_netdissect_kernels.py``); other devices use torch ops; both give
identical results.

The intersections are counted per pixel *pattern* (the set of concepts covering a
mask pixel; see :class:`_MaskPatterns`), so every neuron x concept count is one
bincount and one small matmul, on the model's device.

Ties: ``>= T_k`` keeps every position at the threshold (saturating units whose top
activations are all equal keep their whole active region); when ``T_k`` equals the
unit's minimum (a mostly silent ReLU unit) ``> T_k`` is used instead, so a unit never
covers the whole probe set.  Units with NaN/Inf activations get NaN rows.

Under ``torch.distributed`` each rank screens its shard; the thresholds come from
the union of all ranks' candidates and the counts are summed, so the result equals a
single process exactly.

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
from .base import ChanceLevel, Detection, Detector, null_draws
from .vocabulary import make_vocabulary, probe_vocabulary

try:  # the protocol class lives in recording.py; fall back to a plain base if absent
    from ..recording import RecordingConsumer
except ImportError:  # pragma: no cover
    RecordingConsumer = object  # type: ignore

#: elements of one chunk of upsampled blocks or masks (bounds temporary memory)
_CHUNK_ELEMENTS = 16 * 1024 * 1024
#: largest neurons x mask-patterns table counted with one bincount
_MAX_PATTERN_TABLE = 1 << 24
#: relative tolerance of the ``>= T`` comparison (bilinear upsampling of equal values
#: may be one float32 ulp below them)
_TIE_TOLERANCE = 1e-6
#: candidate slots reserved per neuron, in multiples of m (a batch adds ~m / t after t batches)
_SLOTS_PER_M = 3
#: activations per neuron sampled to estimate the first bound
_SAMPLE_CELLS = 65536
#: bytes of one candidate slot with neighbours: value, cell key, 8 neighbour values
_SLOT_BYTES = 4 + 8 + 8 * 4
#: ... and without them (maps at the masks' size: upsampling is the identity)
_SLOT_BYTES_NO_NEIGHBOURS = 4 + 8
#: (dy, dx) of the 8 neighbours, row-major around the centre
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


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
        memory_bytes: memory allowed for the candidates of the one-pass mode (see the
            module docstring); layers that need more use two passes; 0 forces two.
        name: detector name used in tags.
        progress: tqdm bar for the IoU stage after the pass.
    """

    #: IoU scores span ~0-0.3, so the text space needs a sharper softmax than the
    #: paper's 0.1 (which was set for soft-WPMI scores) to tell concepts apart.
    default_temperature = 0.02

    def __init__(self, vocabulary=None, quantile: float = 0.995, threshold: float = 0.04,
                 memory_bytes: int = 1 << 30, name: str = "netdissect", progress: bool = True):
        if not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"quantile must be in (0, 1), e.g. 0.995 for the top 0.5 %; got {quantile!r}")
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        from ..metadata import check_name

        self.name = check_name(name, "detector name")
        self.quantile = float(quantile)
        self.threshold = float(threshold)
        self.memory_bytes = int(memory_bytes)
        self.progress = bool(progress)
        self._vocabulary: Optional[ConceptVocabulary] = None
        if isinstance(vocabulary, ProbeSet) or (vocabulary is not None and hasattr(vocabulary, "masks")):
            self._vocabulary = probe_vocabulary(vocabulary, "NetDissect(vocabulary=[...])")
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
                "threshold": self.threshold, "memory_bytes": self.memory_bytes,
                "concepts": list(self.vocabulary.names) if self._vocabulary is not None else None,
                "categories": list(self.vocabulary.categories) if self._vocabulary is not None else None}

    def _mask_channels(self, probe) -> Optional[torch.Tensor]:
        """Indices of this detector's concepts among the probe's mask channels (None = all, same order)."""
        if not getattr(probe, "has_masks", False):
            raise ValueError(
                f"NetDissect needs concept masks but the probe set {type(probe).__name__} has none; "
                "use probes.ConceptShapes (or a probe set with masks), or CLIPDissect for unlabelled images"
            )
        probe_vocab = probe_vocabulary(probe, "NetDissect(vocabulary=[...])")
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



class _Candidates:
    """Per neuron, every cell seen so far that can still be among its top ``m``.

    Rows are dense and padded with -inf, so per-neuron selections are row-wise
    ``topk`` calls, and a batch's candidates are written at each row's fill level.
    With ``with_cells`` each slot also holds the cell's key (``image * H * W +
    position``) and its 8 neighbours' values; without, only values are kept and a row
    never needs more than ``m``.
    """

    def __init__(self, channels: int, m: int, with_cells: bool, device, neighbours: bool = True):
        self.m = m
        self.with_cells = with_cells
        self.bound = torch.full((channels,), -math.inf, device=device)
        self.bounded = False        # bound = a true lower bound of the final threshold
        self.seen = 0               # cells per neuron screened so far (same for all neurons)
        self.count = torch.zeros(channels, dtype=torch.int64, device=device)
        # a cell below the final threshold was seen (so the threshold is not the minimum)
        self.below = torch.zeros(channels, dtype=torch.bool, device=device)
        self.values = torch.empty((channels, 0), device=device)
        self.cells = torch.empty((channels, 0), dtype=torch.int64, device=device) if with_cells else None
        # no neighbours needed when the maps are at the masks' size (identity upsampling)
        self.around = torch.empty((channels, 0, 8 if neighbours else 0), device=device) if with_cells else None

    @property
    def nbytes(self) -> int:
        slots = self.values.numel()
        if not self.with_cells:
            return slots * 4
        return slots * (_SLOT_BYTES if self.around.shape[2] else _SLOT_BYTES_NO_NEIGHBOURS)

    def around_rows(self) -> torch.Tensor:
        """``around`` as ``[N * slots, 8 or 0]`` (one row per slot)."""
        return self.around.view(self.around.shape[0] * self.around.shape[1], self.around.shape[2])

    def floor(self) -> torch.Tensor:
        """Lowest value a cell may have and still pass a final threshold >= ``bound``."""
        return _loosened(self.bound)

    def drop_cells(self) -> None:
        """Keep values only (the layer moves to two passes)."""
        self.with_cells = False
        self.cells = self.around = None
        self.prune()

    def screen(self, maps: torch.Tensor, image_ids: torch.Tensor, low: Optional[torch.Tensor] = None) -> None:
        """Add the cells of ``maps [B, N, H, W]`` (contiguous, finite) that may still pass.

        ``image_ids``: probe index of each map; ``low``: a fixed floor instead of the
        running bound (to collect the cells passing known thresholds).
        """
        batch, channels, height, width = maps.shape
        screened = batch * height * width
        kernels = _compiled_kernels() if maps.device.type == "cpu" else None
        if low is None and not self.bounded and self.seen + screened >= self.m:
            if self.seen == 0 and kernels is not None and self._sampled_first_bound(kernels, maps, image_ids):
                return
            # first bound: the m-th largest of everything seen so far (one selection, once)
            if kernels is not None:
                self.bound = torch.empty(channels)
                kernels.kth_largest(self.values.numpy(), self.count.numpy(), maps.numpy(), self.m,
                                    self.bound.numpy())
            else:
                seen = torch.cat([self.values, maps.transpose(0, 1).reshape(channels, -1)], dim=1)
                self.bound = torch.topk(seen, self.m, dim=1, sorted=False).values.amin(dim=1)
            self.bounded = True
            self.prune()
        if kernels is not None:
            self._screen_compiled(kernels, maps, image_ids, low)
            return
        neuron, image, y, x, value = _cells_at_least(maps, self.floor() if low is None else low)
        if self.with_cells:
            key = (image_ids[image] * height + y) * width + x
            around = _neighbours(maps, neuron, image, y, x) if self.around.shape[2] else value.new_empty((value.numel(), 0))
            self.add(neuron, value, screened, key, around)
        else:
            self.add(neuron, value, screened)

    def _sampled_first_bound(self, kernels, maps: torch.Tensor, image_ids: torch.Tensor) -> bool:
        """Screen the first batch above a bound estimated from a sample of it; False if unusable.

        An exact first bound needs a selection over the whole batch.  A value ``v`` with at
        least m cells ``>= v`` is just as valid, and a sample of the batch suggests one
        (expected count 1.5 m).  After screening above ``v`` the store holds every cell
        ``>= floor(v)``, so counting those ``>= v`` verifies it; the neurons where the
        sample misled (fewer than m) are screened again above their exact bound.
        """
        batch, channels, height, width = maps.shape
        screened = batch * height * width
        expected = 1.5 * self.m / screened
        sample_images = min(batch, max(1, math.ceil(_SAMPLE_CELLS / (height * width))))
        rank = math.ceil(expected * sample_images * height * width)
        if expected >= 0.5 or rank < 16:
            return False  # the bound would keep most of the batch anyway, or the sample is too small
        # NCHW copy: the selection reads each neuron's sample as one contiguous row
        sample = maps[torch.linspace(0, batch - 1, sample_images).round().long().unique()].contiguous()
        self.bound = torch.empty(channels)
        kernels.kth_largest(np.empty((channels, 0), dtype=np.float32), np.zeros(channels, dtype=np.int64),
                            sample.numpy(), min(rank, sample[:, 0].numel()), self.bound.numpy())
        self.bounded = True
        self._screen_compiled(kernels, maps, image_ids, None)
        filled = torch.arange(self.values.shape[1])[None, :] < self.count[:, None]
        misled = ((self.values >= self.bound[:, None]) & filled).sum(dim=1) < self.m
        if bool(misled.any()):
            # those neurons start over above their exact m-th largest of the batch
            which = misled.nonzero().squeeze(1)
            exact = torch.empty(which.numel())
            kernels.kth_largest(np.empty((which.numel(), 0), dtype=np.float32),
                                np.zeros(which.numel(), dtype=np.int64),
                                maps.index_select(1, which).contiguous().numpy(), self.m, exact.numpy())
            self.values[misled] = -math.inf
            self.count[misled] = 0
            self.below[misled] = False
            self.bound[which] = exact
            self.seen -= screened
            self._screen_compiled(kernels, maps, image_ids, None, only=misled)
        self.prune()
        return True

    def _screen_compiled(self, kernels, maps: torch.Tensor, image_ids: torch.Tensor,
                         low: Optional[torch.Tensor], only: Optional[torch.Tensor] = None) -> None:
        channels = maps.shape[1]
        screened = maps.shape[0] * maps.shape[2] * maps.shape[3]
        if self.values.shape[1] == 0:
            self._resize(_SLOTS_PER_M * self.m if low is None else max(1, screened // 64))
        active = torch.ones(channels, dtype=torch.bool) if only is None else only.clone()
        taken = torch.zeros(channels, dtype=torch.int64)
        skip = torch.tensor(math.inf)
        # NCHW maps: one neuron per thread; channels-last maps: channels in the inner loop
        shape = tuple(int(size) for size in maps.shape)
        if maps.is_contiguous():
            kernel, layout = kernels.screen, (maps.numpy().reshape(-1), shape)
        else:
            import numba

            # blocks of >= 16 channels (a 64-byte cache line each), at least one per thread
            blocks = min(maps.shape[1], max(numba.get_num_threads(), maps.shape[1] // 16))
            # a view: NHWC is the memory order of channels-last maps
            kernel, layout = kernels.screen_channels_last, (maps.permute(0, 2, 3, 1).numpy().reshape(-1),
                                                             shape, blocks)
        image_ids = image_ids.long().contiguous().numpy()
        if low is None and self.bounded and int(self.count.max()) > self.values.shape[1] // 2:
            # compact before rows overflow: an overflowing row is screened twice
            self.prune()
        while True:
            before = self.count.clone()
            floor = torch.where(active, self.floor() if low is None else low, skip).float().contiguous()
            kernel(*layout, floor.numpy(), image_ids, self.values.numpy(),
                   *self._payload_arrays(), self.count.numpy(), taken.numpy(), self.with_cells)
            overflow = active & (before + taken > self.values.shape[1])
            if not bool(overflow.any()):
                break
            # make room (the bound rises, so fewer cells qualify) and screen those neurons again
            self.prune()
            need = int((self.count + taken)[overflow].max())
            if need > self.values.shape[1]:
                self._resize(max(need, self.values.shape[1] * 3 // 2))
            active = overflow
        self.below |= (taken < screened) & (torch.ones_like(self.below) if only is None else only)
        self.seen += screened
        if low is None and self.bounded:
            # raise the bound after every batch (cheap, no compaction): the next batches
            # then let in ~m / t cells instead of ~m each
            self.bound = self.bound.float().contiguous()
            kernels.raise_bounds(self.values.numpy(), self.count.numpy(), self.m, self.bound.numpy())

    def _payload_arrays(self):
        if self.with_cells:
            return self.cells.numpy(), self.around.numpy()
        channels = self.values.shape[0]
        return np.empty((channels, 0), dtype=np.int64), np.empty((channels, 0, 8), dtype=np.float32)

    def add(self, neuron: torch.Tensor, value: torch.Tensor, screened: int,
            cell: Optional[torch.Tensor] = None, around: Optional[torch.Tensor] = None) -> None:
        """Append the candidates found among ``screened`` cells per neuron (``neuron`` ascending)."""
        channels = self.count.shape[0]
        per_neuron = torch.bincount(neuron, minlength=channels)
        # cells not taken were below floor(bound) <= the final threshold
        self.below |= per_neuron < screened
        self.seen += screened
        if int((self.count + per_neuron).max()) > self.values.shape[1]:
            self.prune()
            need = int((self.count + per_neuron).max())
            if need > self.values.shape[1]:
                self._resize(max(need, _SLOTS_PER_M * self.m, self.values.shape[1] * 3 // 2))
        first = torch.cumsum(per_neuron, 0) - per_neuron
        slot = (neuron * self.values.shape[1] + self.count[neuron]
                + torch.arange(neuron.numel(), device=neuron.device) - first[neuron])
        self.values.view(-1).index_copy_(0, slot, value)
        if self.with_cells:
            self.cells.view(-1).index_copy_(0, slot, cell)
            self.around_rows().index_copy_(0, slot, around)
        self.count += per_neuron

    def prune(self) -> None:
        """Raise the bound to each row's m-th largest value; drop what can no longer pass."""
        if self.values.shape[1] == 0:
            return
        kernels = _compiled_kernels() if self.values.device.type == "cpu" else None
        if kernels is not None and self.with_cells:
            if self.bounded:
                self.bound = self.bound.float().contiguous()
                kernels.raise_bounds(self.values.numpy(), self.count.numpy(), self.m, self.bound.numpy())
            dropped = torch.zeros_like(self.below)
            kernels.compact(self.values.numpy(), self.cells.numpy(), self.around.numpy(), self.count.numpy(),
                            self.floor().float().contiguous().numpy(), True, dropped.numpy())
            self.below |= dropped
            return
        kth = torch.topk(self.values, min(self.m, self.values.shape[1]), dim=1, sorted=False).values
        if self.bounded:
            # rows hold every cell >= floor(bound): their m-th largest is still a lower bound
            self.bound = torch.maximum(self.bound, kth.amin(dim=1))
        slots = self.values.shape[1]
        filled = torch.arange(slots, device=self.values.device)[None, :] < self.count[:, None]
        if not self.with_cells:
            # for the threshold alone the top m values suffice (sorted: -inf padding last)
            if self.bounded:
                self.below |= ((self.values < self.bound[:, None]) & filled).any(dim=1)
            values = torch.full_like(self.values, -math.inf)
            values[:, :kth.shape[1]] = torch.sort(kth, dim=1, descending=True).values
            self.values, self.count = values, torch.isfinite(values).sum(dim=1)
            return
        keep = (self.values >= self.floor()[:, None]) & filled
        self.below |= (filled & ~keep).any(dim=1)
        row, column = keep.nonzero(as_tuple=True)
        kept = torch.bincount(row, minlength=self.count.shape[0])
        old = row * slots + column
        new = old - column + torch.arange(row.numel(), device=row.device) - (torch.cumsum(kept, 0) - kept)[row]
        values = torch.full_like(self.values, -math.inf)
        values.view(-1).index_copy_(0, new, self.values.view(-1).index_select(0, old))
        self.cells.view(-1).index_copy_(0, new, self.cells.view(-1).index_select(0, old))
        rows = self.around_rows()
        rows.index_copy_(0, new, rows.index_select(0, old))
        self.values, self.count = values, kept

    def _resize(self, slots: int) -> None:
        def grown(tensor, fill):
            shape = (tensor.shape[0], slots) + tuple(tensor.shape[2:])
            if tensor.shape[1] == 0:  # a fresh store: reuse the last step's memory when it fits
                return _reused_buffer(shape, tensor.dtype, tensor.device).fill_(fill)
            extra = (tensor.shape[0], slots - tensor.shape[1]) + tuple(tensor.shape[2:])
            return torch.cat([tensor, torch.full(extra, fill, dtype=tensor.dtype, device=tensor.device)], dim=1)

        self.values = grown(self.values, -math.inf)
        if self.with_cells:
            self.cells = grown(self.cells, 0)
            self.around = grown(self.around, 0.0)

    def release(self) -> None:
        """Hand the arrays back for the next step's store (see :func:`_reused_buffer`)."""
        for tensor in (self.values, self.cells, self.around):
            held = sum(t.numel() * t.element_size() for t in _BUFFER_POOL.values())
            if tensor is not None and tensor.numel() and held + tensor.numel() * tensor.element_size() <= _POOL_BYTES:
                _BUFFER_POOL[(tuple(tensor.shape), tensor.dtype, str(tensor.device))] = tensor
        self.values = self.cells = self.around = None

    def hot(self, passing: torch.Tensor):
        """``(neuron, slot)`` of the candidates ``>= passing[neuron]``."""
        slots = torch.arange(self.values.shape[1], device=self.values.device)
        return ((self.values >= passing[:, None]) & (slots[None, :] < self.count[:, None])).nonzero(as_tuple=True)

    def kth_largest(self) -> torch.Tensor:
        """``[N]``: each row's m-th largest value."""
        kernels = _compiled_kernels() if self.values.device.type == "cpu" else None
        if kernels is None:
            return self.top_values().amin(dim=1)
        out = torch.empty(self.values.shape[0])
        no_maps = np.empty((0, self.values.shape[0], 1, 1), dtype=np.float32)
        kernels.kth_largest(self.values.numpy(), self.count.numpy(), no_maps, self.m, out.numpy())
        return out

    def top_values(self) -> torch.Tensor:
        """``[N, m]``: each row's m largest values (-inf padded)."""
        if self.values.shape[1] < self.m:
            self._resize(self.m)
        return torch.topk(self.values, self.m, dim=1, sorted=False).values


class _LayerState:
    """Per-layer state (all on the model's device)."""

    def __init__(self, shape: Tuple[int, int, int], m: int):
        self.channels, self.height, self.width = shape
        self.top_m = m
        self.wants_cells = True                         # one pass: candidates keep their cells
        self.neighbours = True                          # False when the maps are at the masks' size
        self.counted_in_pass_1 = False                  # two passes: cells found again in pass 1
        self.store: Optional[_Candidates] = None
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
        slot = _SLOT_BYTES if self.neighbours else _SLOT_BYTES_NO_NEIGHBOURS
        return _SLOTS_PER_M * self.top_m * self.channels * slot


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
        self.passes = 1
        self.states: Dict[str, _LayerState] = {}
        self._patterns: Optional[_MaskPatterns] = None

    # ------------------------------------------------------------ protocol
    def begin_pass(self, pass_index: int, shapes: Dict[str, Tuple[int, int, int]], probe) -> None:
        if pass_index != 0:
            return
        missing = [layer for layer in self.layers if layer not in shapes]
        if missing:
            raise ValueError(f"NetDissect: no activation maps for layers {missing}")
        self.states = {}
        mask_size = tuple(self._concept_masks(torch.arange(1), "cpu").shape[-2:])
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
            batch_cells = _Candidates(state.channels, state.top_m, True, fmap.device, state.neighbours)
            batch_cells.screen(_dense(fmap), indices.to(fmap.device), low=state.passing)
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
        fmap = _dense(fmap)
        batch, channels, height, width = fmap.shape
        store = state.store
        if store is None:  # created here: the device is the model's
            store = state.store = _Candidates(channels, state.top_m, state.wants_cells, fmap.device,
                                              state.neighbours)
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
    def _count_candidates(self, state: _LayerState, store: _Candidates) -> None:
        """Count the active upsampled pixels of the candidates that pass their threshold."""
        patterns = self._mask_patterns(store.values.device)
        self._prepare_counts(state, patterns, store.values.device)
        kernels = _compiled_kernels() if store.values.device.type == "cpu" else None
        if kernels is not None and state.pattern_hits is not None:
            ys = _bilinear_table(state.height, patterns.height, "cpu")
            xs = _bilinear_table(state.width, patterns.width, "cpu")
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

    def _prepare_counts(self, state: _LayerState, patterns: "_MaskPatterns", device) -> None:
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
        ~0.5 % of the cells pass, and an upsampled pixel can only pass if one of the
        (at most) 2 x 2 cells it interpolates passes; so instead of upsampling every map
        only the blocks of pixels around passing cells are evaluated, exactly like
        ``F.interpolate(mode="bilinear", align_corners=False)``.  (The compiled CPU
        path, ``_netdissect_kernels.count_pixels``, does the same in one loop.)
        """
        device = value.device
        patterns = self._mask_patterns(device)
        channels = state.channels
        out_h, out_w = patterns.height, patterns.width
        if (state.height, state.width) == (out_h, out_w):
            # bilinear resampling to the same size is the identity: passing cells = active pixels
            parts = [(image, neuron, y * out_w + x)]
        else:
            parts = self._active_pixels(state, neuron, image, y, x, value, around, (out_h, out_w))
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
                    step = max(1, _CHUNK_ELEMENTS // max(1, self.n_concepts))
                    for start in range(0, neuron.numel(), step):
                        state.intersection[table].index_add_(0, neuron[start:start + step],
                                                             bits[pattern[start:start + step]])

    def _active_pixels(self, state: _LayerState, neuron, image, y, x, value, around,
                       out_size: Tuple[int, int]):
        """(image, neuron, pixel) of the upsampled pixels passing the threshold, in chunks.

        A block is the set of output pixels interpolated between the cells
        ``{y0, y0+1} x {x0, x0+1}`` (clamped at the border); a passing cell is a corner
        of the blocks anchored at ``(y-1|y, x-1|x)``.  Each block is evaluated once, by
        the first of its corners (row-major) that passes, so no de-duplication is needed.
        """
        height, width = state.height, state.width
        out_h, out_w = out_size
        device = value.device
        grid = torch.cat([around[:, :4], value[:, None], around[:, 4:]], dim=1).view(-1, 3, 3)
        passing = grid >= state.passing[neuron][:, None, None]
        ys, xs = _bilinear_table(height, out_h, device), _bilinear_table(width, out_w, device)
        owned_parts = []
        for ay in (-1, 0):
            for ax in (-1, 0):
                # the block's corners as (row, col) of the 3 x 3 grid, row-major; ours is (1, 1)
                corners = [(1 + ay + r, 1 + ax + c) for r in (0, 1) for c in (0, 1)]
                owner = corners.index((1, 1))
                owned = torch.ones_like(value, dtype=torch.bool)
                for r, c in corners[:owner]:
                    owned &= ~passing[:, r, c]
                if ay:
                    owned &= y >= 1
                if ax:
                    owned &= x >= 1
                which = owned.nonzero().squeeze(1)
                corner_values = torch.stack([grid[which, r, c] for r, c in corners], dim=1)   # [a, 4]
                owned_parts.append((which, y[which] + ay, x[which] + ax, corner_values))
        which = torch.cat([p[0] for p in owned_parts])
        y0, x0 = torch.cat([p[1] for p in owned_parts]), torch.cat([p[2] for p in owned_parts])
        corner_values = torch.cat([p[3] for p in owned_parts])
        block = ys.block_weight.shape[1] * xs.block_weight.shape[1]
        step = max(1, _CHUNK_ELEMENTS // (4 * block))
        parts = []
        for start in range(0, which.numel(), step):
            chunk = slice(start, start + step)
            corner = corner_values[chunk]
            wy = ys.block_weight[y0[chunk]][:, :, None]                                 # [a, Ly, 1]
            wx = xs.block_weight[x0[chunk]][:, None, :]                                 # [a, 1, Lx]
            top = (1 - wx) * corner[:, 0, None, None] + wx * corner[:, 1, None, None]
            bottom = (1 - wx) * corner[:, 2, None, None] + wx * corner[:, 3, None, None]
            block_values = (1 - wy) * top + wy * bottom
            chunk_which = which[chunk]
            # padding entries have weight NaN, so they never pass
            hit, block_row, block_col = (block_values >= state.passing[neuron[chunk_which]][:, None, None]
                                         ).nonzero(as_tuple=True)
            row = ys.pixels[y0[chunk][hit], block_row]
            col = xs.pixels[x0[chunk][hit], block_col]
            source = chunk_which[hit]
            parts.append((image[source], neuron[source], row * out_w + col))
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
        kernels = _compiled_kernels() if torch.device(device).type == "cpu" and n_words == 1 else None
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
            masks = self._concept_masks(chunk, device)
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
            return _MaskPatterns(pattern, bits.double(), pixel_count, (height, width))
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


def _cells_at_least(maps: torch.Tensor, low: torch.Tensor):
    """``(neuron, image, y, x, value)`` of the cells of ``maps [B, N, H, W]`` that are ``>= low[N]``,
    ordered by neuron (then image, y, x).

    Same cells as ``(maps >= low).nonzero()``, but only ~1 % of the cells pass and they
    cluster, so the (slow, serial) nonzero runs on the map rows whose maximum passes;
    a row maximum is a cheap vectorised reduction.
    """
    _, channels, height, width = maps.shape
    live = (maps.amax(dim=3) >= low[None, :, None]).permute(1, 0, 2).nonzero()   # neuron-major
    neuron, image, y = live.unbind(1)
    rows = maps.view(-1, width).index_select(0, (image * channels + neuron) * height + y)   # [L, W]
    which, x = (rows >= low[neuron][:, None]).nonzero(as_tuple=True)
    return neuron[which], image[which], y[which], x, rows.view(-1).index_select(0, which * width + x)


def _neighbours(maps: torch.Tensor, neuron, image, y, x) -> torch.Tensor:
    """``[K, 8]`` values of the 8 neighbours of cells of ``maps [B, N, H, W]``, replicated at the
    border (as bilinear interpolation clamps there), in :data:`_NEIGHBOURS` order."""
    _, channels, height, width = maps.shape
    flat = maps.reshape(-1)
    map_row = (image * channels + neuron) * height
    rows = {dy: (map_row + (y + dy).clamp(0, height - 1)) * width for dy in (-1, 0, 1)}
    cols = {dx: (x + dx).clamp(0, width - 1) for dx in (-1, 0, 1)}
    return torch.stack([flat.index_select(0, rows[dy] + cols[dx]) for dy, dx in _NEIGHBOURS], dim=1)


def _dense(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` if NCHW- or channels-last-contiguous on CPU (the compiled loops read both), else a
    contiguous copy."""
    if maps.is_contiguous():
        return maps
    if maps.device.type == "cpu" and _USE_COMPILED and maps.is_contiguous(memory_format=torch.channels_last):
        return maps
    return maps.contiguous()


def _loosened(values: torch.Tensor) -> torch.Tensor:
    """``values`` minus the tie tolerance: the lowest value still counted as ``>=`` them."""
    return values - _TIE_TOLERANCE * values.abs()


def _passing_values(thresholds: torch.Tensor, strict: torch.Tensor) -> torch.Tensor:
    """The value an upsampled pixel must reach: one comparison for both rules.

    ``> T`` is ``>=`` the next float above T; ``>= T`` tolerates one-ulp rounding of
    the bilinear interpolation.
    """
    above = torch.nextafter(thresholds, torch.full_like(thresholds, math.inf))
    return torch.where(strict, above, _loosened(thresholds))


#: arrays of finished candidate stores, by (shape, dtype, device): every logged step
#: needs the same ones, and allocating ~100 MB afresh each time costs page faults
_BUFFER_POOL: Dict[tuple, torch.Tensor] = {}
#: most memory the pool keeps between steps
_POOL_BYTES = 256 << 20


def _reused_buffer(shape: tuple, dtype, device) -> torch.Tensor:
    key = (tuple(shape), dtype, str(device))
    buffer = _BUFFER_POOL.pop(key, None)
    return buffer if buffer is not None else torch.empty(shape, dtype=dtype, device=device)


def _compiled_kernels():
    """The numba loops for CPU tensors, or None to use the torch code (``_USE_COMPILED = False``)."""
    if not _USE_COMPILED:
        return None
    from . import _netdissect_kernels

    return _netdissect_kernels


#: tests switch this off to check the torch path (used for other devices) gives the same result
_USE_COMPILED = True


def _world_size() -> int:
    from ..recording import rank_and_world

    return rank_and_world()[1]


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
