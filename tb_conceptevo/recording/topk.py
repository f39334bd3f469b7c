"""The running per-neuron top-k: values descending, ties by the lower probe index, so
the result is exact and independent of the batch size or of how the probe set is
sharded across distributed ranks (:func:`_all_gather_topk` merges the shards)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


def ranking_keys(values: torch.Tensor, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 keys, all distinct along the last axis, ordered as (value descending,
    column ascending) of float32 ``values`` ``[..., M]``: the order a stable descending
    sort gives, found by ``topk`` (one selection instead of a sort of every row).
    ``columns``: each value's column (default its place on the last axis).

    A float's bits, with the non-sign bits of negatives flipped, order like the floats;
    ``+ 0.0`` makes -0.0 equal to 0.0 first, as comparisons see them.
    """
    bits = (values.float() + 0.0).view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    width = values.shape[-1]
    if columns is None:
        columns = torch.arange(width, device=values.device, dtype=torch.int64)
    return (ordered << 32) + ((1 << 31) - 1 - columns)


class _TopK:
    """Running per-neuron top-k of one layer (values desc, ties by lower probe index)."""

    def __init__(self, channels: int, k: int, device):
        self.k = k
        self.values = torch.full((channels, k), -math.inf, dtype=torch.float32, device=device)
        self.ids = torch.full((channels, k), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros((channels, k), dtype=torch.int64, device=device)
        self.invalid = torch.zeros(channels, dtype=torch.bool, device=device)

    def merge(self, values: torch.Tensor, indices: torch.Tensor, fmap: Optional[torch.Tensor],
              positions: Optional[torch.Tensor] = None) -> None:
        """Merge one batch: ``values`` ``[B, C]``, ``indices`` ``[B]`` ascending and larger
        than every index merged before (so a stable sort keeps the tie order); argmax
        positions from ``fmap`` ``[B, C, H, W]``, or given as ``positions`` ``[B, C]``.

        Only channels where some image beats the current k-th value are re-sorted, and
        the argmax position is computed only for images that enter a top-k: after the
        first batches almost nothing enters, so the merge costs little next to the
        forward pass.
        """
        # Strictly greater: on a tie the earlier (lower) index already in the list wins.
        enters = values.t() > self.values[:, -1:]
        rows = enters.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        batch = values.t()[rows]
        cand_values = torch.cat([self.values[rows], batch], dim=1)
        # columns are in probe-index order among equal values (the kept list, then the
        # batch): the first k of a stable descending sort, by one selection in float32
        if cand_values.dtype == torch.float32:
            order = torch.topk(ranking_keys(cand_values), self.k, dim=1).indices
        else:
            order = torch.sort(cand_values, dim=1, descending=True, stable=True).indices[:, : self.k]
        from_batch = order >= self.k
        batch_pos = (order - self.k).clamp(min=0)
        new_ids = torch.where(from_batch, indices[batch_pos], torch.gather(self.ids[rows], 1, order.clamp(max=self.k - 1)))
        old_pos = torch.gather(self.positions[rows], 1, order.clamp(max=self.k - 1))
        entrant_rows, entrant_slots = from_batch.nonzero(as_tuple=True)
        new_pos = old_pos.clone()
        if entrant_rows.numel() and positions is not None:
            new_pos[entrant_rows, entrant_slots] = positions[batch_pos[entrant_rows, entrant_slots], rows[entrant_rows]]
        elif entrant_rows.numel():
            batch_size, channels = fmap.shape[:2]
            flat = fmap.reshape(batch_size * channels, -1)
            picked = batch_pos[entrant_rows, entrant_slots] * channels + rows[entrant_rows]
            new_pos[entrant_rows, entrant_slots] = torch.index_select(flat, 0, picked).argmax(dim=1)
        self.values[rows] = torch.gather(cand_values, 1, order)
        self.ids[rows] = new_ids
        self.positions[rows] = new_pos

    def merge_compiled(self, values: torch.Tensor, positions: torch.Tensor, entered: torch.Tensor,
                       indices: torch.Tensor, kth: np.ndarray) -> None:
        """:meth:`merge` as one compiled loop (CPU tensors; positions given; ``entered``
        ``[B, 8 * W]`` uint8, 0 where a pair cannot enter): the same result.  ``kth``
        (float32 ``[channels]``) receives each channel's k-th value."""
        import numba

        from . import _kernels

        words = entered.numpy().view(np.uint64)
        blocks = max(1, min(words.shape[1] // 32, 4 * numba.get_num_threads()))
        _kernels.merge_topk(values.numpy(), positions.numpy(), words, entered.numpy(), indices.numpy(), self.values.numpy(),
                            self.ids.numpy(), self.positions.numpy(), kth, blocks)


def merge_topk(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, k: int):
    """Exact top-k of candidate rows ``[C, M]`` in any order: values desc, then id asc."""
    by_id = torch.sort(torch.where(ids < 0, torch.iinfo(torch.int64).max, ids), dim=1, stable=True).indices
    values, ids, positions = (torch.gather(t, 1, by_id) for t in (values, ids, positions))
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return tuple(torch.gather(t, 1, order) for t in (values, ids, positions))


def _all_gather_topk(top: _TopK) -> None:
    """Merge every rank's top-k into the exact global top-k (same on all ranks)."""
    dist = torch.distributed
    world = dist.get_world_size()
    parts = {}
    for field in ("values", "ids", "positions"):
        tensor = getattr(top, field).contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(gathered, tensor)
        parts[field] = torch.cat(gathered, dim=1)
    top.values, top.ids, top.positions = merge_topk(parts["values"], parts["ids"], parts["positions"], top.k)
    invalid = top.invalid.to(torch.uint8)
    dist.all_reduce(invalid, op=dist.ReduceOp.MAX)
    top.invalid = invalid.bool()
