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


@numba.njit(cache=True, inline="always")
def _first_cell_at(cells, v):  # pragma: no cover
    """The first index of ``cells`` (any strides) holding ``v``, -1 if none: where a map's
    max is, for the few pairs that may enter a top-k."""
    for s in range(cells.shape[0]):
        if cells[s] == v:
            return s
    return -1


@numba.njit(cache=True, inline="always")
def _finish_image(best, kth, values, entered, positions, image, channels_last):  # pragma: no cover
    """One image's maxima ``best`` ``[C]`` into ``values``; the "may enter" flags into
    ``entered`` (1 above the neuron's k-th value ``kth`` or non-finite, else 0) and, for
    the finite pairs above it, the first cell of the max into ``positions``; ``image``
    ``[S, C]`` when ``channels_last`` else ``[C, S]``.  Returns how many are non-finite.
    (Measured: splitting this into a branch-free flag pass and a scan pass was slower in
    the recording pass, though faster alone.)"""
    bad = 0
    for c in range(best.shape[0]):
        v = best[c]
        values[c] = v
        if not np.isfinite(v):
            entered[c] = 1
            bad += 1
        elif v > kth[c]:
            entered[c] = 1
            positions[c] = _first_cell_at(image[:, c] if channels_last else image[c], v)
        else:
            entered[c] = 0
    return bad


@parallel_loop
def entrant_positions(maps, response, kth, mean, values, positions, entered, col):  # pragma: no cover
    """Copy the ``[B, C]`` ``response`` of ``maps`` ``[B, C, S]`` (any strides) into
    ``values`` and, for the pairs above their neuron's k-th value ``kth`` ``[C]`` (only
    those can enter a top-k), the first position of the map's max into ``positions``;
    ``entered`` (uint8) gets 1 for those pairs and the non-finite ones, 0 for the rest
    (the merge skips runs of zeros, see :func:`merge_topk`).  Returns how many pairs
    have a non-finite response (the caller then re-reduces the layer exactly).

    ``values``, ``positions`` and ``entered`` (here and in the loops below) are whole
    C-contiguous ``[B, M]`` buffers and the layer's columns start at ``col``: the
    compiler then knows each row's columns are contiguous (measured: a strided view of
    the same columns keeps the per-pair loops scalar).

    The response itself is a tensor ``amax``/``mean`` (vectorised); a max's position
    is the first cell equal to it, found by a scan that stops there."""
    batch, channels, size = maps.shape
    bad = np.zeros(batch, np.int64)
    for b in numba.prange(batch):
        out, flags, at = values[b, col:col + channels], entered[b, col:col + channels], positions[b, col:col + channels]
        for c in range(channels):
            v = response[b, c]
            out[c] = v
            flags[c] = 1
            if not np.isfinite(v):
                bad[b] += 1
                continue
            if not v > kth[c]:
                flags[c] = 0
                continue
            if mean:
                best = maps[b, c, 0]
                best_at = 0
                for s in range(1, size):
                    if maps[b, c, s] > best:
                        best = maps[b, c, s]
                        best_at = s
                at[c] = best_at
            else:
                cell = _first_cell_at(maps[b, c], v)
                if cell >= 0:
                    at[c] = cell
    return bad.sum()


#: Cells per map below which :func:`max_entrant_positions` replaces a tensor ``amax``
#: plus :func:`entrant_positions`.  Measured on 2 cores (64 images a batch): 3.5-6x faster
#: for 2x2 to 7x7 maps, even at 8x8, 1.6x slower at 16x16, where torch's reduction is
#: vectorised over whole cache lines.  A speed choice only: both give the same result.
SMALL_MAP_CELLS = 64


# ``reassoc`` only: it lets the finiteness sum below be vectorised; without ``nnan`` and
# ``nsz`` the compiler may not fold ``x * 0`` to 0, so the sum stays NaN for a NaN or Inf.
@parallel_loop(fastmath={"reassoc"})
def max_entrant_positions(maps, kth, values, positions, entered, col):  # pragma: no cover
    """:func:`entrant_positions` with the response computed here: the max of each map
    of ``maps`` ``[B, C, S]`` (C-contiguous), NaN propagated as by ``torch.amax``.

    Why: torch's ``amax`` over a map of a few cells spends most of its time per map,
    not per cell (measured: 5-7x a copy of the same tensor for 4x4 maps), and such
    maps are most of a deep CNN's layers at probe resolution.  Here each image's maps are
    one sequential read: the max of each map by a branch-free loop the compiler
    unrolls, one sum of ``x * 0`` over the image (0 when every cell is finite, else NaN),
    and only for an image where that sum is not 0 a second, NaN-propagating pass."""
    batch, channels, size = maps.shape
    bad = np.zeros(batch, np.int64)
    for b in numba.prange(batch):
        image = maps[b]
        out = values[b, col:col + channels]
        if size == 4:  # 2x2 maps: a literal tree (measured: 2x the speed of the loop below)
            for c in range(channels):
                out[c] = max(max(image[c, 0], image[c, 1]), max(image[c, 2], image[c, 3]))
        elif size == 16:  # 4x4: a constant trip count, fully unrolled
            for c in range(channels):
                m = image[c, 0]
                for s in range(1, 16):
                    m = max(m, image[c, s])
                out[c] = m
        else:
            for c in range(channels):
                m = image[c, 0]
                for s in range(1, size):
                    m = max(m, image[c, s])
                out[c] = m
        flat = image.reshape(channels * size)
        check = np.float32(0)
        for i in range(channels * size):
            check += flat[i] * np.float32(0)
        if check != 0:  # some cell of this image is NaN or +-Inf: its maps again, exactly
            for c in range(channels):
                m = image[c, 0]
                for s in range(1, size):
                    x = image[c, s]
                    if x > m or x != x:
                        m = x
                out[c] = m
        bad[b] = _finish_image(out, kth, out, entered[b, col:col + channels], positions[b, col:col + channels],
                               image, False)
    return bad.sum()


@parallel_loop
def single_cell_entrants(maps, kth, values, positions, entered, col):  # pragma: no cover
    """:func:`max_entrant_positions` for maps of one cell, ``maps`` ``[B, C]``
    (C-contiguous; a squeeze-excitation conv, a pooled or ``[B, C]`` output): each map
    is its own max and mean, at position 0.  One branch-free pass per image, which the
    compiler vectorises (measured on 2 cores: ``[64, 576]`` 64-72 -> 8 us, 8x).
    ``positions`` is not written: every path writes 0 for a one-cell map, and the
    caller's buffer starts at 0 (half of this loop's memory traffic, measured in the
    pass: the output buffers are what a call after a conv finds out of cache)."""
    batch, channels = maps.shape
    bad = np.zeros(batch, np.int64)
    for b in numba.prange(batch):
        image = maps[b]
        out, flags = values[b, col:col + channels], entered[b, col:col + channels]
        count = 0
        for c in range(channels):
            v = image[c]
            out[c] = v
            finite = (v - v) == 0   # False for NaN and +-Inf
            flags[c] = (v > kth[c]) | (not finite)
            count += not finite
        bad[b] = count
    return bad.sum()


#: Channels-last maps with at least this many cells and at most BLOCKED_MAX_CHANNELS
#: channels take their max over blocks of rows (see below).
BLOCKED_MIN_CELLS = 256
BLOCKED_MAX_CHANNELS = 128
#: Floats per block of rows (a multiple of the channel count at most this long).
_BLOCK_FLOATS = 512


@parallel_loop
def max_entrant_positions_channels_last(maps, kth, values, positions, entered, col):  # pragma: no cover
    """:func:`max_entrant_positions` for maps stored channels-last: ``maps`` ``[B, S, C]``
    (C-contiguous; a ``[B, C, H, W]`` tensor in ``torch.channels_last`` seen as
    ``[B, H * W, C]`` without a copy), the same result.

    Why: a channels-last map's cells of one channel are ``C`` floats apart, so a
    channels-first view of it has to be copied before a per-map reduction.  Here the max
    runs across channels, cell after cell: ``np.maximum`` of two contiguous rows, which
    is vectorised and propagates NaN as ``torch.amax`` does (measured on 2 cores: 1.2-11x
    faster than torch's ``amax`` of the same channels-last maps, with no copy).  With few
    channels a row is too short for that loop to pay off, so rows are taken ``r`` at a
    time: ``np.maximum`` of whole blocks of ``r`` rows (one long contiguous loop each),
    then of the ``r`` rows of the result (measured: ``[64, 16, 32, 32]`` 179 -> 77 us,
    ``[64, 64, 28, 28]`` 296 -> 192 us).  Max is exact in any order, so both give the
    same values (a tie between -0.0 and 0.0 may keep either zero)."""
    batch, size, channels = maps.shape
    rows = max(1, min(size, _BLOCK_FLOATS // channels))
    blocked = size >= BLOCKED_MIN_CELLS and channels <= BLOCKED_MAX_CHANNELS and rows > 1
    width = rows * channels
    blocks = size // rows
    bad = np.zeros(batch, np.int64)
    for b in numba.prange(batch):
        image = maps[b]
        if blocked:
            flat = image.reshape(size * channels)
            acc = flat[:width].copy()
            for block in range(1, blocks):
                np.maximum(acc, flat[block * width:(block + 1) * width], acc)
            tail = size * channels - blocks * width
            if tail:
                part = acc[:tail]
                np.maximum(part, flat[blocks * width:], part)
            best = acc[:channels]
            for r in range(1, rows):
                np.maximum(best, acc[r * channels:(r + 1) * channels], best)
        else:
            best = image[0].copy()
            for s in range(1, size):
                np.maximum(best, image[s], best)
        bad[b] = _finish_image(best, kth, values[b, col:col + channels], entered[b, col:col + channels],
                               positions[b, col:col + channels], image, True)
    return bad.sum()


@parallel_loop
def merge_topk(values, positions, entered, flags, indices, top_values, top_ids, top_positions, kth, blocks):  # pragma: no cover
    """Merge a batch into the running top-k: ``values``/``positions`` ``[B, N]``, probe
    ``indices`` ``[B]`` ascending and above every index merged before; ``top_*``
    ``[N, k]`` (values descending, ties by the lower index) updated in place.

    A pair enters only if strictly above the neuron's k-th value, so on a tie the
    earlier index stays ahead.  ``flags`` ``[B, 8 * W]`` (uint8, ``8 * W >= N``): the
    pairs' "may enter" flags written by the layer loops (1 where a pair may enter, 0
    where it cannot); ``entered``: the same bytes as ``[B, W]`` uint64 words.  A zero
    word skips its 8 pairs, so once the top-k have filled most of a batch is skipped 8
    pairs at a time instead of compared pair by pair, and in a word that is not zero a
    pair whose own flag is 0 is skipped at a byte read (instead of a read of its top-k
    row).  The test itself decides; a flag only allows skipping.  ``kth`` ``[N]``
    receives each neuron's k-th value, contiguous: the merge's own test reads it (the
    values of 8 pairs in one cache line), and so do the layer loops' entry tests.
    ``blocks``: parallel blocks of whole words of columns, each read row by row.
    """
    batch, neurons = values.shape
    k = top_values.shape[1]
    words = entered.shape[1]
    per_block = (words + blocks - 1) // blocks
    for block in numba.prange(blocks):
        first_word = block * per_block
        last_word = min(words, first_word + per_block)
        for n in range(8 * first_word, min(neurons, 8 * last_word)):
            kth[n] = top_values[n, k - 1]
        for b in range(batch):
            for w in range(first_word, last_word):
                if entered[b, w] == 0:
                    continue
                for n in range(8 * w, min(neurons, 8 * w + 8)):
                    if flags[b, n] == 0:
                        continue
                    v = values[b, n]
                    if not v > kth[n]:   # the k-th value, kept contiguous: 8 pairs' in one read
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
                    kth[n] = top_values[n, k - 1]


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
        row = values[b]
        for seg in range(segments):
            cells = row[starts[seg]:starts[seg] + widths[seg]]
            count = 0
            # what a value must beat to enter: -inf until k are kept (so NaN and -inf never
            # enter), then the k-th kept (a tie stays with the lower column); one compare
            # per value (measured: 15-40 % faster than testing "finite" and "full" apart)
            bar = -np.inf
            for c in range(cells.shape[0]):
                v = cells[c]
                if not v > bar:
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
                if count == k:
                    bar = kept[k - 1]
            for j in range(k):
                out[rows[b], seg, j] = kept_at[j] if j < count else -1
