"""Bilinear upsampling of activation maps to the masks' size, only where it can pass.

Only ~0.5 % of the cells pass a neuron's threshold, and an upsampled pixel can only
pass if one of the (at most) 2 x 2 cells it interpolates passes; so instead of
upsampling every map, only the blocks of pixels around passing cells are evaluated,
exactly like ``F.interpolate(mode="bilinear", align_corners=False)``.  The compiled
CPU path (``_kernels.count_pixels``) reads the same tables.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .caches import BoundedCache

#: elements of one chunk of upsampled blocks or masks (bounds temporary memory)
CHUNK_ELEMENTS = 16 * 1024 * 1024


def active_pixels(passing_value: torch.Tensor, neuron, image, y, x, value, around,
                  size: Tuple[int, int], out_size: Tuple[int, int], tables: BoundedCache):
    """(image, neuron, pixel) of the upsampled pixels passing the threshold, in chunks.

    A block is the set of output pixels interpolated between the cells
    ``{y0, y0+1} x {x0, x0+1}`` (clamped at the border); a passing cell is a corner
    of the blocks anchored at ``(y-1|y, x-1|x)``.  Each block is evaluated once, by
    the first of its corners (row-major) that passes, so no de-duplication is needed.

    ``passing_value[N]``: the value an upsampled pixel of each neuron must reach; the
    cells are given by ``neuron``, ``image``, ``y``, ``x``, ``value`` and their 8
    neighbour values ``around``; ``size``/``out_size``: of the maps and of the masks;
    ``tables``: where the bilinear tables are kept (:func:`bilinear_table`).
    """
    height, width = size
    out_h, out_w = out_size
    device = value.device
    grid = torch.cat([around[:, :4], value[:, None], around[:, 4:]], dim=1).view(-1, 3, 3)
    passing = grid >= passing_value[neuron][:, None, None]
    ys, xs = bilinear_table(tables, height, out_h, device), bilinear_table(tables, width, out_w, device)
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
    step = max(1, CHUNK_ELEMENTS // (4 * block))
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
        hit, block_row, block_col = (block_values >= passing_value[neuron[chunk_which]][:, None, None]
                                     ).nonzero(as_tuple=True)
        row = ys.pixels[y0[chunk][hit], block_row]
        col = xs.pixels[x0[chunk][hit], block_col]
        source = chunk_which[hit]
        parts.append((image[source], neuron[source], row * out_w + col))
    return parts


class BilinearTable:
    """1-D bilinear interpolation (PyTorch, ``align_corners=False``) from ``src`` to ``dst``
    cells, per source cell ("anchor"): the output indices interpolated between it and
    the next cell (``pixels``, -1 padded) and their weights of the next cell
    (``block_weight``, NaN padded)."""

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
        self.block_weight = torch.from_numpy(block_weight).to(device)
        self.pixels = torch.from_numpy(pixels).to(device)


def bilinear_table(tables: BoundedCache, src: int, dst: int, device) -> BilinearTable:
    """The table from ``src`` to ``dst`` cells on ``device``, built once per ``tables``."""
    return tables.get((int(src), int(dst), str(device)), lambda: BilinearTable(src, dst, device))
