"""The per-neuron candidate store of NetDissect's one-pass mode (see the package docstring).

Each neuron keeps every cell that can still be among its top ``m`` activations (the
cells at or above a running lower bound of its final threshold), with the cell's key
and its 8 neighbours; screening and selection run as compiled loops on CPU
(:mod:`._kernels`) or as torch ops, with identical results.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .caches import BufferPool

#: relative tolerance of the ``>= T`` comparison (bilinear upsampling of equal values
#: may be one float32 ulp below them)
_TIE_TOLERANCE = 1e-6
#: candidate slots reserved per neuron, in multiples of m (a batch adds ~m / t after t batches)
SLOTS_PER_M = 3
#: activations per neuron sampled to estimate the first bound
_SAMPLE_CELLS = 65536
#: bytes of one candidate slot with neighbours: value, cell key, 8 neighbour values
SLOT_BYTES = 4 + 8 + 8 * 4
#: ... and without them (maps at the masks' size: upsampling is the identity)
SLOT_BYTES_NO_NEIGHBOURS = 4 + 8
#: (dy, dx) of the 8 neighbours, row-major around the centre
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


class Candidates:
    """Per neuron, every cell seen so far that can still be among its top ``m``.

    Rows are dense and padded with -inf, so per-neuron selections are row-wise
    ``topk`` calls, and a batch's candidates are written at each row's fill level.
    With ``with_cells`` each slot also holds the cell's key (``image * H * W +
    position``) and its 8 neighbours' values; without, only values are kept and a row
    never needs more than ``m``.

    ``kernels``: the compiled loops (:mod:`._kernels`) to use when the store is on CPU,
    None for the torch ops; ``buffers``: where fresh arrays come from and
    :meth:`release` hands them back (None: allocated, then dropped).
    """

    def __init__(self, channels: int, m: int, with_cells: bool, device, neighbours: bool = True,
                 kernels=None, buffers: Optional[BufferPool] = None):
        self.m = m
        self.kernels = kernels if torch.device(device).type == "cpu" else None
        self.buffers = buffers
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
        return slots * (SLOT_BYTES if self.around.shape[2] else SLOT_BYTES_NO_NEIGHBOURS)

    def around_rows(self) -> torch.Tensor:
        """``around`` as ``[N * slots, 8 or 0]`` (one row per slot)."""
        return self.around.view(self.around.shape[0] * self.around.shape[1], self.around.shape[2])

    def floor(self) -> torch.Tensor:
        """Lowest value a cell may have and still pass a final threshold >= ``bound``."""
        return loosened(self.bound)

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
        kernels = self.kernels
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
            self._resize(SLOTS_PER_M * self.m if low is None else max(1, screened // 64))
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
                self._resize(max(need, SLOTS_PER_M * self.m, self.values.shape[1] * 3 // 2))
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
        kernels = self.kernels
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
                return self._fresh(shape, tensor.dtype, tensor.device).fill_(fill)
            extra = (tensor.shape[0], slots - tensor.shape[1]) + tuple(tensor.shape[2:])
            return torch.cat([tensor, torch.full(extra, fill, dtype=tensor.dtype, device=tensor.device)], dim=1)

        self.values = grown(self.values, -math.inf)
        if self.with_cells:
            self.cells = grown(self.cells, 0)
            self.around = grown(self.around, 0.0)

    def _fresh(self, shape: tuple, dtype, device) -> torch.Tensor:
        if self.buffers is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return self.buffers.take(shape, dtype, device)

    def release(self) -> None:
        """Hand the arrays back for the next step's store (see :class:`.caches.BufferPool`)."""
        if self.buffers is not None:
            for tensor in (self.values, self.cells, self.around):
                self.buffers.give(tensor)
        self.values = self.cells = self.around = None

    def hot(self, passing: torch.Tensor):
        """``(neuron, slot)`` of the candidates ``>= passing[neuron]``."""
        slots = torch.arange(self.values.shape[1], device=self.values.device)
        return ((self.values >= passing[:, None]) & (slots[None, :] < self.count[:, None])).nonzero(as_tuple=True)

    def kth_largest(self) -> torch.Tensor:
        """``[N]``: each row's m-th largest value."""
        kernels = self.kernels
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


def dense_maps(maps: torch.Tensor, kernels) -> torch.Tensor:
    """``maps`` if NCHW-contiguous, or channels-last-contiguous on CPU with the compiled loops
    (``kernels`` not None; they read both), else a contiguous copy."""
    if maps.is_contiguous():
        return maps
    if maps.device.type == "cpu" and kernels is not None and maps.is_contiguous(memory_format=torch.channels_last):
        return maps
    return maps.contiguous()


def loosened(values: torch.Tensor) -> torch.Tensor:
    """``values`` minus the tie tolerance: the lowest value still counted as ``>=`` them."""
    return values - _TIE_TOLERANCE * values.abs()
