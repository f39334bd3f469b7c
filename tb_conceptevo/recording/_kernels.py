"""Compiled CPU loops of the recording pass (numba; the torch code paths serve other
devices and are the reference).

Why compiled loops: a network of many small layers (``mobilenet_v3_small``: 52 convs)
pays a fixed cost per tensor operation, and as tensor operations the bookkeeping of one
layer and batch is a dozen of them (reduction, the entering test, gathers, argmax of
the entrants, scatters); selecting each image's top channels and merging the batch into
the running top-k are a dozen more per batch, over int64 keys built for exact ties
(cheap on an accelerator, where the torch paths also avoid syncs).  As
loops each is one sequential read: after a (vectorised) tensor reduction the position
of the max is looked up only for the pairs that may enter a top-k, the merge touches a
pair only if it beats the neuron's k-th value, and a row's top channels are kept by
insertion into k slots.

Each loop runs in parallel over rows that no two threads share, and reads in a fixed
order, so results do not depend on the thread count.  Ties go to the earlier index,
exactly as the stable sorts of the torch paths (tested against them).
"""

from __future__ import annotations

import numba
import numpy as np

from .._compiled import parallel_loop


@parallel_loop
def entrant_positions(maps, response, kth, mean, values, positions):  # pragma: no cover
    """Copy the ``[B, C]`` ``response`` of ``maps`` ``[B, C, S]`` (any strides) into
    ``values`` and, for the pairs above their neuron's k-th value ``kth`` ``[C]`` (only
    those can enter a top-k), the first position of the map's max into ``positions``;
    returns how many pairs have a non-finite response (the caller then re-reduces the
    layer exactly).

    The response itself is a tensor ``amax``/``mean`` (vectorised); a max's position
    is the first cell equal to it, found by a scan that stops there."""
    batch, channels, size = maps.shape
    bad = np.zeros(batch, np.int64)
    for b in numba.prange(batch):
        for c in range(channels):
            v = response[b, c]
            values[b, c] = v
            if not np.isfinite(v):
                bad[b] += 1
                continue
            if not v > kth[c]:
                continue
            if mean:
                best = maps[b, c, 0]
                at = 0
                for s in range(1, size):
                    if maps[b, c, s] > best:
                        best = maps[b, c, s]
                        at = s
                positions[b, c] = at
            else:
                for s in range(size):
                    if maps[b, c, s] == v:
                        positions[b, c] = s
                        break
    return bad.sum()


@parallel_loop
def merge_topk(values, positions, indices, top_values, top_ids, top_positions, blocks):  # pragma: no cover
    """Merge a batch into the running top-k: ``values``/``positions`` ``[B, N]``, probe
    ``indices`` ``[B]`` ascending and above every index merged before; ``top_*``
    ``[N, k]`` (values descending, ties by the lower index) updated in place.

    A pair enters only if strictly above the neuron's k-th value, so on a tie the
    earlier index stays ahead.  ``blocks`` parallel column blocks, each read row by row.
    """
    batch, neurons = values.shape
    k = top_values.shape[1]
    width = (neurons + blocks - 1) // blocks
    for block in numba.prange(blocks):
        lo = block * width
        hi = min(neurons, lo + width)
        for b in range(batch):
            for n in range(lo, hi):
                v = values[b, n]
                if not v > top_values[n, k - 1]:
                    continue
                j = k - 1
                while j > 0 and top_values[n, j - 1] < v:
                    top_values[n, j] = top_values[n, j - 1]
                    top_ids[n, j] = top_ids[n, j - 1]
                    top_positions[n, j] = top_positions[n, j - 1]
                    j -= 1
                top_values[n, j] = v
                top_ids[n, j] = indices[b]
                top_positions[n, j] = positions[b, n]


@parallel_loop
def segment_topk(values, starts, widths, rows, out):  # pragma: no cover
    """Each row's ``k = out.shape[2]`` highest columns within every segment: ``values``
    ``[B, N]``, segment ``l`` the columns ``starts[l] : starts[l] + widths[l]``;
    ``out[rows[b], l]`` receives the column indices within the segment (highest first,
    ties by the lower column, -1 where fewer than k values are above -inf; NaN never
    counts)."""
    batch = values.shape[0]
    segments = starts.shape[0]
    k = out.shape[2]
    for b in numba.prange(batch):
        kept = np.empty(k, np.float32)
        kept_at = np.empty(k, np.int64)
        for seg in range(segments):
            start = starts[seg]
            count = 0
            for c in range(widths[seg]):
                v = values[b, start + c]
                if not v > -np.inf:
                    continue
                if count == k and not v > kept[k - 1]:
                    continue
                j = count if count < k else k - 1
                while j > 0 and kept[j - 1] < v:
                    kept[j] = kept[j - 1]
                    kept_at[j] = kept_at[j - 1]
                    j -= 1
                kept[j] = v
                kept_at[j] = c
                if count < k:
                    count += 1
            for j in range(k):
                out[rows[b], seg, j] = kept_at[j] if j < count else -1
