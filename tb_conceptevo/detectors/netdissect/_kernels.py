"""Compiled CPU loops of NetDissect (numba; the torch code paths serve other devices).

Why compiled loops: screening a batch touches every activation once but keeps ~1 % of
them, each with its 8 neighbours.  As tensor operations that is a reduction, two
``nonzero`` calls and a dozen gathers over scattered indices (each a full temporary);
as one loop per neuron it is a single sequential read of the maps.  The same holds for
counting the upsampled pixels around the cells that pass.  Both loops run in parallel
over neurons, so no two threads ever write the same row.  The row selections
(``kth_largest``, ``raise_bounds``), the compaction and the packing of masks into
pattern ids follow the same reasoning.

All arithmetic is float32 in the same order as the torch paths, so both give
bit-identical results (tested).
"""

from __future__ import annotations

import numba
import numpy as np

from ..._compiled import parallel_loop

_ONE = np.float32(1.0)
#: Fibonacci hashing multiplier (2**64 / golden ratio, as a signed 64-bit integer)
_HASH = np.int64(-7046029254386353131)


@numba.njit(inline="always")
def _keep(flat, base, y, x, row_stride, col_stride, height, width, value, n, slot, key,
          values, keys, around, with_cells):  # pragma: no cover
    """Write a cell to ``slot`` of row n: its value, key and 8 clamped neighbours.

    ``flat[base + y * row_stride + x * col_stride]`` is the cell's map (any memory layout).
    """
    values[n, slot] = value
    if with_cells:
        keys[n, slot] = key
    if with_cells and around.shape[2] == 8:  # no neighbours kept for maps at the masks' size
        up = base + max(y - 1, 0) * row_stride
        mid = base + y * row_stride
        down = base + min(y + 1, height - 1) * row_stride
        left, centre, right = max(x - 1, 0) * col_stride, x * col_stride, min(x + 1, width - 1) * col_stride
        around[n, slot, 0] = flat[up + left]
        around[n, slot, 1] = flat[up + centre]
        around[n, slot, 2] = flat[up + right]
        around[n, slot, 3] = flat[mid + left]
        around[n, slot, 4] = flat[mid + right]
        around[n, slot, 5] = flat[down + left]
        around[n, slot, 6] = flat[down + centre]
        around[n, slot, 7] = flat[down + right]


@parallel_loop
def screen(flat, shape, low, image_ids, values, keys, around, count, taken, with_cells):  # pragma: no cover
    """Append the cells of NCHW maps (``flat``, ``shape = (B, N, H, W)``) that are ``>= low[n]``
    to row n of the store.

    Row ``n`` is written from ``count[n]`` on; ``taken[n]`` is how many cells qualified.
    A row that would overflow is left as it was (``count[n]`` unchanged, -inf after it), so the caller
    can make room and screen that neuron again (``low = +inf`` skips a neuron).
    Cells enter each row in (image, y, x) order.
    """
    batch, channels, height, width = shape
    slots = values.shape[1]
    cells = height * width
    for n in numba.prange(channels):
        floor = low[n]
        if floor == np.inf:
            continue
        start = count[n]
        found = 0
        for b in range(batch):
            base = (b * channels + n) * cells
            for within in range(cells):
                value = flat[base + within]
                if value >= floor:
                    if start + found < slots:
                        y = within // width
                        _keep(flat, base, y, within - y * width, width, 1, height, width, value, n,
                              start + found, image_ids[b] * cells + within, values, keys, around, with_cells)
                    found += 1
        taken[n] = found
        if start + found <= slots:
            count[n] = start + found
        else:  # undo the partial row: slots past count stay -inf
            values[n, start:] = -np.inf


@parallel_loop
def screen_channels_last(flat, shape, blocks, low, image_ids, values, keys, around, count, taken,
                         with_cells):  # pragma: no cover
    """:func:`screen` for channels-last maps (NHWC in memory): channels are the inner loop,
    and each of ``blocks`` threads owns a block of channels, so rows still have one writer."""
    batch, channels, height, width = shape
    slots = values.shape[1]
    cells = height * width
    per_block = (channels + blocks - 1) // blocks
    for block in numba.prange(blocks):
        first = block * per_block
        size = max(0, min(channels, first + per_block) - first)
        found = np.zeros(size, dtype=np.int64)
        floor = low[first:first + size].copy()
        for pixel in range(batch * cells):
            offset = pixel * channels + first
            hit = False
            for j in range(size):  # branch-free test first: most pixels have no candidate
                hit |= flat[offset + j] >= floor[j]
            if not hit:
                continue
            b = pixel // cells
            within = pixel - b * cells
            y = within // width
            for j in range(size):
                value = flat[offset + j]
                if value >= floor[j]:
                    n = first + j
                    if count[n] + found[j] < slots:
                        _keep(flat, b * cells * channels + n, y, within - y * width, width * channels, channels,
                              height, width, value, n, count[n] + found[j], image_ids[b] * cells + within,
                              values, keys, around, with_cells)
                    found[j] += 1
        for j in range(size):
            n = first + j
            if floor[j] != np.inf:
                taken[n] = found[j]
                if count[n] + found[j] <= slots:
                    count[n] += found[j]
                else:  # undo the partial row: slots past count stay -inf
                    values[n, count[n]:] = -np.inf


@parallel_loop
def count_pixels(values, keys, around, count, passing, height, width,
                 weight_y, pixel_y, weight_x, pixel_x, out_height, out_width, pixel_pattern,
                 image_map, hits, active_pixels):  # pragma: no cover
    # Long on purpose: one compiled loop nest over candidates, upsampled pixels and null draws.
    """Add the upsampled pixels passing ``passing[n]`` around every candidate of row ``n``.

    ``hits[d, n, pattern]`` counts them per mask pattern of image ``image_map[d, image]``
    (row 0: the image itself; the others: the permutations of the chance-level null),
    ``active_pixels[n]`` in total.
    The blocks of output pixels between the cells ``{y0, y0+1} x {x0, x0+1}`` whose
    corners include a passing cell are evaluated once each, by their first passing
    corner in row-major order (see :func:`.upsample.active_pixels`).
    ``weight_*``/``pixel_*`` are the tables of :class:`BilinearTable` (padding: pixel -1).
    """
    channels = values.shape[0]
    cells_per_map = height * width
    out_per_image = out_height * out_width
    grid = np.empty((channels, 3, 3), dtype=np.float32)
    for n in numba.prange(channels):
        threshold = passing[n]
        g = grid[n]
        for s in range(count[n]):
            value = values[n, s]
            if not value >= threshold:
                continue
            key = keys[n, s]
            image = key // cells_per_map
            within = key - image * cells_per_map
            if height == out_height and width == out_width:  # identity: the cell is the pixel
                for d in range(image_map.shape[0]):
                    hits[d, n, pixel_pattern[image_map[d, image] * out_per_image + within]] += 1
                active_pixels[n] += 1
                continue
            y = within // width
            x = within - y * width
            g[0, 0] = around[n, s, 0]
            g[0, 1] = around[n, s, 1]
            g[0, 2] = around[n, s, 2]
            g[1, 0] = around[n, s, 3]
            g[1, 1] = value
            g[1, 2] = around[n, s, 4]
            g[2, 0] = around[n, s, 5]
            g[2, 1] = around[n, s, 6]
            g[2, 2] = around[n, s, 7]
            for ay in range(-1, 1):
                if y + ay < 0:
                    continue
                r0 = 1 + ay
                for ax in range(-1, 1):
                    if x + ax < 0:
                        continue
                    c0 = 1 + ax
                    owner = (1 - r0) * 2 + (1 - c0)
                    owned = True
                    for corner in range(owner):
                        if g[r0 + corner // 2, c0 + corner % 2] >= threshold:
                            owned = False
                    if not owned:
                        continue
                    v00 = g[r0, c0]
                    v01 = g[r0, c0 + 1]
                    v10 = g[r0 + 1, c0]
                    v11 = g[r0 + 1, c0 + 1]
                    y0 = y + ay
                    x0 = x + ax
                    for i in range(pixel_y.shape[1]):
                        row = pixel_y[y0, i]
                        if row < 0:
                            break
                        wy = weight_y[y0, i]
                        for j in range(pixel_x.shape[1]):
                            col = pixel_x[x0, j]
                            if col < 0:
                                break
                            wx = weight_x[x0, j]
                            top = (_ONE - wx) * v00 + wx * v01
                            bottom = (_ONE - wx) * v10 + wx * v11
                            if (_ONE - wy) * top + wy * bottom >= threshold:
                                pixel = row * out_width + col
                                for d in range(image_map.shape[0]):
                                    hits[d, n, pixel_pattern[image_map[d, image] * out_per_image + pixel]] += 1
                                active_pixels[n] += 1


@parallel_loop
def kth_largest(values, count, maps, k, out):  # pragma: no cover
    """``out[n]``: the k-th largest of row ``n``'s first ``count[n]`` values and ``maps[:, n]``
    (``-inf`` when there are fewer than k).  Introselect, O(row) per neuron."""
    channels = values.shape[0]
    batch = maps.shape[0]
    cells = maps.shape[2] * maps.shape[3]
    for n in numba.prange(channels):
        size = count[n] + batch * cells
        if size < k:
            out[n] = -np.inf
            continue
        row = np.empty(size, dtype=np.float32)
        row[:count[n]] = values[n, :count[n]]
        position = count[n]
        for b in range(batch):
            for y in range(maps.shape[2]):
                for x in range(maps.shape[3]):
                    row[position] = maps[b, n, y, x]
                    position += 1
        out[n] = np.partition(row, size - k)[size - k]


@parallel_loop
def raise_bounds(values, count, k, bound):  # pragma: no cover
    """``bound[n] = max(bound[n], v)`` for a ``v`` that at least ``k`` of row n's values reach.

    ``v`` is estimated from every 8th value (at 1.08x the share, so it lands just below
    the k-th largest) and verified by counting; rows where the estimate fails get the
    exact k-th largest.  About 4x cheaper than selecting over the whole row.
    """
    for n in numba.prange(values.shape[0]):
        size = count[n]
        if size < k:
            continue
        candidate = -np.inf
        sample = values[n, :size:8].copy()
        rank = int(np.ceil(1.08 * k * sample.shape[0] / size))
        if rank < sample.shape[0] and rank >= 16:
            candidate = np.partition(sample, sample.shape[0] - rank)[sample.shape[0] - rank]
            reach = 0
            for s in range(size):
                if values[n, s] >= candidate:
                    reach += 1
            if reach < k:
                candidate = -np.inf
        if candidate == -np.inf:
            row = values[n, :size].copy()
            candidate = np.partition(row, size - k)[size - k]
        if candidate > bound[n]:
            bound[n] = candidate


@parallel_loop
def compact(values, keys, around, count, floor, with_cells, dropped):  # pragma: no cover
    """Keep, in order, the first ``count[n]`` slots of row ``n`` that are ``>= floor[n]``;
    pad the rest with -inf; ``dropped[n]``: whether any slot was removed."""
    channels, slots = values.shape
    for n in numba.prange(channels):
        kept = 0
        for s in range(count[n]):
            if values[n, s] >= floor[n]:
                if kept != s:
                    values[n, kept] = values[n, s]
                    if with_cells:
                        keys[n, kept] = keys[n, s]
                        around[n, kept, :] = around[n, s, :]
                kept += 1
        dropped[n] = kept < count[n]
        values[n, kept:] = -np.inf
        count[n] = kept


@parallel_loop
def pack_masks(masks, codes):  # pragma: no cover
    """``codes[b, y, x]``: bit c set when ``masks[b, c, y, x]`` (at most 62 concepts)."""
    batch, concepts, height, width = masks.shape
    for b in numba.prange(batch):
        for y in range(height):
            for x in range(width):
                code = 0
                for c in range(concepts):
                    if masks[b, c, y, x]:
                        code |= np.int64(1) << c
                codes[b, y, x] = code


@numba.njit(cache=True, nogil=True)
def dense_ids(codes, ids):  # pragma: no cover
    """``ids[i]``: a dense id of ``codes[i]`` (in order of first appearance); returns the distinct
    codes.  Open addressing: masks have few distinct patterns, so this is one linear scan."""
    capacity = 1024
    table_codes = np.empty(capacity, dtype=np.int64)
    table_ids = np.full(capacity, -1, dtype=np.int64)
    distinct = np.empty(capacity, dtype=np.int64)
    n_distinct = 0
    last_code, last_id = np.int64(-1), np.int64(-1)
    for i in range(codes.shape[0]):
        code = codes[i]
        if code == last_code:  # neighbouring pixels usually share a pattern
            ids[i] = last_id
            continue
        slot = (code * _HASH) & (capacity - 1)
        while table_ids[slot] != -1 and table_codes[slot] != code:
            slot = (slot + 1) & (capacity - 1)
        if table_ids[slot] == -1:
            if 2 * (n_distinct + 1) > capacity:  # grow and re-insert
                capacity *= 2
                old_codes = distinct[:n_distinct].copy()
                table_codes = np.empty(capacity, dtype=np.int64)
                table_ids = np.full(capacity, -1, dtype=np.int64)
                grown = np.empty(capacity, dtype=np.int64)
                grown[:n_distinct] = old_codes
                distinct = grown
                for j in range(n_distinct):
                    s = (old_codes[j] * _HASH) & (capacity - 1)
                    while table_ids[s] != -1:
                        s = (s + 1) & (capacity - 1)
                    table_codes[s] = old_codes[j]
                    table_ids[s] = j
                slot = (code * _HASH) & (capacity - 1)
                while table_ids[slot] != -1:
                    slot = (slot + 1) & (capacity - 1)
            table_codes[slot] = code
            table_ids[slot] = n_distinct
            distinct[n_distinct] = code
            n_distinct += 1
        ids[i] = table_ids[slot]
        last_code, last_id = code, table_ids[slot]
    return distinct[:n_distinct].copy()
