"""Each batch's activation maps reduced to one response per (image, channel), with the
position of its maximum, and merged into the running top-k.

Non-finite values are detected from the reduction itself, so the common all-finite
case costs one pass over a map; a layer seen producing NaN/Inf is ranked from then on
by an exact (slower) path on its finite values only.  On a CPU the reduction, the
position of each maximum and the merge are compiled loops (:func:`_compiled_loops`);
elsewhere tensor operations; both give the same result.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _kernels
from .topk import _TopK


def _compiled_loops(device) -> bool:
    """Whether the recording bookkeeping runs as compiled loops (:mod:`._kernels`): on a
    CPU, where each tensor operation costs a fixed overhead and an argmax 3-10x an
    amax; on an accelerator tensor operations are cheap and syncs stall the pipeline."""
    return torch.device(device).type == "cpu"


def _response(fmap: torch.Tensor, reduce: str, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``[B, C]`` response, NaN/Inf propagated (see :func:`_reduce`)."""
    if extra is None and fmap.shape[2] * fmap.shape[3] == 1:
        # a 1x1 map (a squeeze-excitation conv, a [B, C] output) is its own max and mean:
        # a view instead of a reduction (measured: 1.4 % of add_concepts on mobilenet_v3_small)
        return fmap.reshape(fmap.shape[0], fmap.shape[1])
    if extra is None:
        return fmap.amax(dim=(2, 3)) if reduce == "max" else fmap.mean(dim=(2, 3))
    flat = torch.cat([fmap.flatten(2), extra], dim=2)
    return flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)


def _fast_reduce(fmap: torch.Tensor, reduce: str, extra: Optional[torch.Tensor] = None):
    """``(response [B, C], argmax position [B, C])`` without any device sync; NaN and
    +Inf propagate into the response (the caller checks once per batch, see
    :func:`_reduce` for the exact path)."""
    flat = fmap.flatten(2)
    if reduce == "max" and extra is None:
        return flat.max(dim=2)
    positions = flat.argmax(dim=2)
    if extra is not None:
        flat = torch.cat([flat, extra], dim=2)
    return (flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)), positions


def _reduce(fmap: torch.Tensor, reduce: str, extra: Optional[torch.Tensor] = None):
    """``(response [B, C] with NaN where non-finite, sortable values, bad [C])``.

    ``extra`` ``[B, C, P]``: values outside the map that count in the response (a
    transformer's class/register tokens when asked for).  Non-finite values are
    detected from the reduction itself (max and mean propagate NaN and +Inf; mean also
    -Inf), so the common all-finite case costs one pass over the map.  With
    ``reduce="max"`` a -Inf that never reaches a channel's max changes nothing recorded
    and is not flagged.  When something is non-finite, a slow exact path ranks on the
    finite values only.
    """
    if extra is None:
        response = fmap.amax(dim=(2, 3)) if reduce == "max" else fmap.mean(dim=(2, 3))
    else:
        flat = torch.cat([fmap.flatten(2), extra], dim=2)
        response = flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)
    if bool(torch.isfinite(response).all()):  # one sync per batch and layer, not per neuron
        return response, response, torch.zeros(fmap.shape[1], dtype=torch.bool, device=fmap.device)
    flat = fmap.flatten(2) if extra is None else torch.cat([fmap.flatten(2), extra], dim=2)
    finite = torch.isfinite(flat)
    bad_pairs = (~finite).any(dim=2)
    minus_inf = torch.tensor(-math.inf, device=flat.device)
    if reduce == "max":
        sortable = torch.where(finite, flat, minus_inf).amax(dim=2)
    else:
        count = finite.sum(dim=2)
        sortable = torch.where(finite, flat, torch.zeros((), device=flat.device)).sum(dim=2) / count.clamp(min=1)
        sortable = torch.where(count > 0, sortable, minus_inf)
    shown = torch.where(bad_pairs, torch.tensor(math.nan, device=flat.device), sortable)
    return shown, sortable, bad_pairs.any(dim=0)




class _BatchResponses:
    """Pass 0's bookkeeping of one batch: per layer, the ``[B, C]`` responses and argmax
    positions (the best over the calls of a layer that runs several times per forward
    pass), merged into the top-k after the forward pass.

    One top-k over the channels of every layer (layer after layer): a batch's responses
    and positions of all layers are written side by side into one ``[B, N]`` buffer
    each and merged at once, so the cost per layer is its reduction only.  On a CPU the
    reduction, with the position of the max, is one compiled pass over the map and the
    merge one compiled loop; elsewhere they are tensor operations with one sync per
    batch.  Both give the same result.
    """

    def __init__(self, layers: Sequence[Tuple[str, int]], k: int, device, reduce: str):
        """``layers``: ``(name, channels)`` in the order of the top-k's rows."""
        starts = np.cumsum([0] + [channels for _, channels in layers])[:-1].tolist()
        self.rows = {name: slice(start, start + channels) for (name, channels), start in zip(layers, starts)}
        self.n_columns = int(sum(r.stop - r.start for r in self.rows.values()))
        self.top = _TopK(self.n_columns, k, device)
        self.device = device
        self.reduce = reduce
        self.compiled = _compiled_loops(device)
        # Layers seen producing NaN/Inf: from then on ranked by the exact (slower) path.
        self.exact_layers: set = set()
        # Per layer, this batch's [shown (NaN where non-finite; exact layers only), bad]
        self._pending: Dict[str, List] = {}
        self._values: Optional[torch.Tensor] = None
        self._positions: Optional[torch.Tensor] = None
        self._unchecked = False   # a layer's finiteness is left to newly_non_finite
        # compiled loops: each neuron's k-th value, contiguous (the merge keeps it), and per
        # layer its slice and the batch buffers with the layer's first column, made once
        # (buffers are reused while the batch size holds)
        self._kth_all = np.full(self.n_columns, -np.inf, np.float32)
        self._kth = {name: self._kth_all[rows] for name, rows in self.rows.items()} if self.compiled else {}
        self._columns: Dict[str, tuple] = {}
        self._merged = 0   # batches merged so far

    def start_batch(self, batch_size: int) -> None:
        """New batch.  The buffers of the last one are reused (not cleared): every value
        is written, and a position is read only where it was written (pairs that enter),
        except in the columns of one-cell maps, whose positions stay at the 0 they start
        with (every path writes 0 there; the compiled loop leaves them)."""
        self._pending.clear()
        self._unchecked = False
        if self._values is not None and self._values.shape[0] == batch_size:
            return
        self._values = torch.empty((batch_size, self.n_columns), dtype=torch.float32, device=self.device)
        self._positions = torch.zeros((batch_size, self.n_columns), dtype=torch.int64, device=self.device)
        if self.compiled:
            # per pair, whether it may enter a top-k (the merge skips words of zeros),
            # padded to whole 8-byte words; every layer's columns are rewritten each batch
            words = (self.n_columns + 7) // 8
            self._entered = torch.ones((batch_size, 8 * words), dtype=torch.uint8, device=self.device)
            buffers = (self._values.numpy(), self._positions.numpy(), self._entered.numpy())
            self._columns = {name: buffers + (rows.start,) for name, rows in self.rows.items()}

    def add(self, name: str, fmap: torch.Tensor, extra: Optional[torch.Tensor], first_call: bool,
            want_response: bool) -> Optional[torch.Tensor]:
        """Reduce one call of layer ``name``; returns its ``[B, C]`` response (NaN where
        non-finite) when ``want_response`` (else None)."""
        if first_call and extra is None and self.compiled and name not in self.exact_layers:
            # the common case, kept lean: it runs once per layer and batch (832 times a
            # pass on mobilenet_v3_small), so every tensor view made here counts
            if not self._compiled_add(name, fmap):
                self._pending[name] = [None, None]
                return self._values[:, self.rows[name]].clone() if want_response else None  # the buffer is reused
            self.exact_layers.add(name)  # rare: NaN/Inf met; this layer takes the exact path from now on
        rows = self.rows[name]
        if first_call:
            values, positions = self._values[:, rows], self._positions[:, rows]
        else:  # contiguous, as the compiled loops take their outputs
            shape = (self._values.shape[0], rows.stop - rows.start)
            values = torch.empty(shape, dtype=self._values.dtype, device=self.device)
            positions = torch.zeros(shape, dtype=self._positions.dtype, device=self.device)
        shown = bad = None
        if self.compiled:  # a later call or the exact path may change any pair: none is skipped
            self._entered[:, rows].fill_(1)
        if name not in self.exact_layers and self.compiled and extra is None:
            scratch = np.empty(values.shape, np.uint8)
            if self._compiled_add(name, fmap, (values.numpy(), positions.numpy(), scratch, 0)):
                self.exact_layers.add(name)
        elif name not in self.exact_layers:
            sortable, eager_positions = _fast_reduce(fmap, self.reduce, extra)
            values.copy_(sortable)
            positions.copy_(eager_positions)
            self._unchecked = True
        if name in self.exact_layers:
            shown, sortable, exact_positions, bad = self._exact(fmap, extra)
            values.copy_(sortable)
            positions.copy_(exact_positions)
        self._keep_best(name, first_call, values, positions, shown, bad)
        if not want_response:
            return None
        if shown is None:  # NaN/Inf found at the end of the batch redo it; consumers see NaN now
            shown = torch.where(torch.isfinite(values), values, torch.tensor(math.nan, device=values.device))
        return shown

    def _compiled_add(self, name: str, fmap: torch.Tensor, into=None) -> int:
        """One layer's batch through the compiled loops: responses, the entrants'
        positions and the "may enter" flags written into ``into`` (default: the layer's
        columns of this batch); returns how many pairs have a non-finite response (the
        caller then takes the exact path).  Maps of one cell, and with ``reduce="max"``
        channels-last maps and small maps, are reduced inside the loop; other maps by a
        tensor reduction first.  (In the first batch, with no k-th value yet, the loops
        find the position of every pair's max.  Measured on mobilenet_v3_small: finding
        the batch's own top k first, as :meth:`_entry_bar` does for the tensor-reduced
        maps, then reading each map again cost 9 ms more per pass in the first batch
        than it saved in the merge, 4 ms.)"""
        into = self._columns[name] if into is None else into
        batch, channels, height, width = fmap.shape
        # numpy views, not torch ones: this runs 832 times a pass on mobilenet_v3_small,
        # and a torch permute + view costs 2.7 us against numpy's 1.1
        contiguous = fmap.is_contiguous()
        if height * width == 1 and contiguous:  # its own max and mean (channels-last too)
            return _kernels.single_cell_entrants(fmap.numpy().reshape(batch, channels), self._kth[name], *into)
        if self.reduce == "max" and contiguous and height * width < _kernels.SMALL_MAP_CELLS:
            return _kernels.max_entrant_positions(fmap.numpy().reshape(batch, channels, -1), self._kth[name], *into)
        if self.reduce == "max" and not contiguous and fmap.is_contiguous(memory_format=torch.channels_last):
            # seen as [B, H * W, C] without a copy
            cells = fmap.numpy().transpose(0, 2, 3, 1).reshape(batch, height * width, channels)
            return _kernels.max_entrant_positions_channels_last(cells, self._kth[name], *into)
        response = _response(fmap, self.reduce)
        return _kernels.entrant_positions(fmap.flatten(2).numpy(), response.numpy(), self._entry_bar(name, response),
                                          self.reduce == "mean", *into)

    def _entry_bar(self, name: str, response: torch.Tensor) -> np.ndarray:
        """Per channel, a value that every pair entering the top-k is above: the running
        k-th value, and before the first merge (when that is -inf and every pair of a
        layer would need its position) just below the batch's own k-th highest response,
        since an entrant is among the batch's top k.  With k = 10 and batches of 64, the
        first batch then scans about 16 % of its pairs instead of all of them: over 16
        batches about 0.7 maps' worth of scanning instead of 1.5."""
        kth = self._kth[name]
        if self._merged or response.shape[0] < self.top.k:
            return kth
        batch_kth = torch.topk(response, self.top.k, dim=0).values[-1].numpy()
        return np.maximum(kth, np.nextafter(batch_kth, np.float32(-np.inf)))  # entrants may tie the k-th

    def _exact(self, fmap, extra):
        response, sortable, bad = _reduce(fmap, self.reduce, extra)
        # Argmax among finite values only: NaN would win torch's argmax.
        safe = fmap if not bool(bad.any()) else torch.nan_to_num(fmap, nan=-math.inf, posinf=-math.inf)
        return response, sortable, safe.flatten(2).argmax(dim=2), bad

    def _keep_best(self, name, first_call, values, positions, shown, bad) -> None:
        if first_call:
            self._pending[name] = [shown, bad]
            return
        best = self._pending[name]
        kept_values, kept_positions = self._values[:, self.rows[name]], self._positions[:, self.rows[name]]
        better = values > kept_values
        kept_positions.copy_(torch.where(better, positions, kept_positions))
        if best[0] is not None and shown is not None:
            best[0] = torch.where(better, shown, best[0])
        kept_values.copy_(torch.where(better, values, kept_values))
        if bad is not None:
            best[1] = bad if best[1] is None else best[1] | bad

    def responses(self) -> torch.Tensor:
        """This batch's ``[B, N]`` responses of every layer side by side, NaN where
        non-finite (after :meth:`newly_non_finite`: only exact layers can have any)."""
        if not self.exact_layers:
            return self._values
        return torch.cat([self._pending[name][0] if self._pending[name][0] is not None else self._values[:, rows]
                          for name, rows in self.rows.items()], dim=1)

    def newly_non_finite(self) -> List[str]:
        """Layers reduced by tensor operations that met NaN/Inf in this batch (one check
        over every layer, one sync per batch); they take the exact path from now on and
        the batch must be redone.  (The compiled loops check each layer as they go.)"""
        if not self._unchecked or bool(torch.isfinite(self._values).all()):
            return []
        fast = [name for name in self.rows if name not in self.exact_layers]
        if not fast:
            return []
        flags = torch.stack([torch.isfinite(self._values[:, self.rows[name]]).all() for name in fast]).tolist()
        newly = [name for name, ok in zip(fast, flags) if not ok]
        self.exact_layers.update(newly)
        return newly

    def merge(self, indices: torch.Tensor) -> None:
        """Merge this batch (probe ``indices``) into the top-k of every layer."""
        for name, rows in self.rows.items():
            if self._pending[name][1] is not None:
                self.top.invalid[rows] |= self._pending[name][1]
        self._merged += 1
        if self.compiled:
            self.top.merge_compiled(self._values, self._positions, self._entered, indices, self._kth_all)
        else:
            self.top.merge(self._values, indices, None, positions=self._positions)
