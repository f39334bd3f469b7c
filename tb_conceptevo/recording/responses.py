"""Each batch's activation maps reduced to one response per (image, channel), with the
position of its maximum, and merged into the running top-k.

Non-finite values are detected from the reduction itself, so the common all-finite
case costs one pass over a map; a layer seen producing NaN/Inf is ranked from then on
by an exact (slower) path on its finite values only.  Where the argmax runs depends on
the device (:func:`_lazy_positions`); both ways give the same result.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .topk import _TopK


def _lazy_positions(device) -> bool:
    return torch.device(device).type == "cpu"


def _response(fmap: torch.Tensor, reduce: str, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``[B, C]`` response, NaN/Inf propagated (see :func:`_reduce`)."""
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
    of all layers are merged at once, so the cost per layer is its reduction only, with
    no per-layer merge or device sync.
    """

    def __init__(self, layers: Sequence[Tuple[str, int]], k: int, device, reduce: str):
        """``layers``: ``(name, channels)`` in the order of the top-k's rows."""
        starts = np.cumsum([0] + [channels for _, channels in layers])[:-1].tolist()
        self.rows = {name: slice(start, start + channels) for (name, channels), start in zip(layers, starts)}
        self.top = _TopK(int(sum(r.stop - r.start for r in self.rows.values())), k, device)
        self.reduce = reduce
        # Layers seen producing NaN/Inf: from then on ranked by the exact (slower) path.
        self.exact_layers: set = set()
        # On a CPU a sync costs nothing and a pass over a map is dear: one small sync per
        # layer and batch lets the argmax run only for channels that may enter the top-k.
        # On an accelerator syncs stall the pipeline and passes are cheap: max with indices
        # for every channel, and one sync per batch.  Both give the same result.
        self.lazy_positions = _lazy_positions(device)
        # Per layer, this batch's [sortable, positions, finite flag, bad]
        self._pending: Dict[str, List] = {}

    def start_batch(self) -> None:
        self._pending.clear()

    def add(self, name: str, fmap: torch.Tensor, extra: Optional[torch.Tensor], first_call: bool,
            want_response: bool) -> Optional[torch.Tensor]:
        """Reduce one call of layer ``name``; returns its ``[B, C]`` response (NaN where
        non-finite) when ``want_response`` (else possibly None)."""
        if name in self.exact_layers:
            response, sortable, positions, bad = self._exact(fmap, extra)
            finite = None
        elif self.lazy_positions:
            response, sortable, positions, bad = self._lazy(name, fmap, extra)
            finite = None
        else:
            sortable, positions = _fast_reduce(fmap, self.reduce, extra)
            response, finite, bad = None, torch.isfinite(sortable), None
        self._keep_best(name, first_call, sortable, positions, finite, bad)
        if response is None and want_response:
            response = torch.where(finite, sortable, torch.tensor(math.nan, device=sortable.device))
        return response

    def _exact(self, fmap, extra):
        response, sortable, bad = _reduce(fmap, self.reduce, extra)
        # Argmax among finite values only: NaN would win torch's argmax.
        safe = fmap if not bool(bad.any()) else torch.nan_to_num(fmap, nan=-math.inf, posinf=-math.inf)
        return response, sortable, safe.flatten(2).argmax(dim=2), bad

    def _lazy(self, name, fmap, extra):
        sortable = _response(fmap, self.reduce, extra)
        # One sync: all finite? may anything enter the top-k?  Argmax positions are then
        # computed only for the channels that may.
        enters = sortable > self.top.values[self.rows[name], -1]
        finite_all, entering = torch.stack([torch.isfinite(sortable).all().long(), enters.sum()]).tolist()
        if not finite_all:  # rare: this layer takes the exact path from now on
            self.exact_layers.add(name)
            return self._exact(fmap, extra)
        if entering * 2 > enters.numel():
            # most pairs enter (the first batches): one argmax over the whole map is
            # cheaper than gathering their maps; the other pairs' positions go unused
            return sortable, sortable, fmap.flatten(2).argmax(dim=2), None
        positions = torch.zeros(sortable.shape, dtype=torch.int64, device=sortable.device)
        if entering:  # only the (image, channel) pairs above the k-th value
            b, c = enters.nonzero(as_tuple=True)
            positions[b, c] = fmap[b, c].flatten(1).argmax(dim=1)
        return sortable, sortable, positions, None

    def _keep_best(self, name, first_call, sortable, positions, finite, bad) -> None:
        if first_call:
            self._pending[name] = [sortable, positions, finite, bad]
            return
        best = self._pending[name]
        better = sortable > best[0]
        best[0] = torch.where(better, sortable, best[0])
        best[1] = torch.where(better, positions, best[1])
        if finite is not None:
            best[2] = finite if best[2] is None else best[2] & finite
        if bad is not None:
            best[3] = bad if best[3] is None else best[3] | bad

    def newly_non_finite(self) -> List[str]:
        """Layers of the eager (accelerator) path that met NaN/Inf in this batch, one sync
        per batch; they take the exact path from now on and the batch must be redone."""
        fast = [name for name in self.rows if self._pending[name][2] is not None]
        if not fast:
            return []
        flags = torch.stack([self._pending[name][2].all() for name in fast]).tolist()
        newly = [name for name, ok in zip(fast, flags) if not ok]
        self.exact_layers.update(newly)
        return newly

    def merge(self, indices: torch.Tensor) -> None:
        """Merge this batch (probe ``indices``) into the top-k of every layer."""
        for name, rows in self.rows.items():
            if self._pending[name][3] is not None:
                self.top.invalid[rows] |= self._pending[name][3]
        self.top.merge(torch.cat([self._pending[name][0] for name in self.rows], dim=1), indices, None,
                       positions=torch.cat([self._pending[name][1] for name in self.rows], dim=1))
