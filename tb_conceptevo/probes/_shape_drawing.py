"""Drawing ConceptShapes images: the shapes (inside predicates in the shape's own
coordinates), the palette, the background textures, and their composition into
uint8 pixels, all vectorised over a chunk of images.

Shapes are flat-coloured and not anti-aliased, so the shape masks are exact.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np

from ._counter_random import _STREAM_PIXEL_NOISE, _uniform

# ---------------------------------------------------------------------------- shapes
# Each predicate takes local coordinates (u, v) in units of the shape radius (already
# rotated, v pointing down) and returns the inside mask.


def _fraction(values):
    """``values mod 1`` (np.mod is ~10x slower on float32 arrays)."""
    return values - np.floor(values)


def _regular_polygon(u, v, sides: int, circumradius: float, first_normal: float):
    apothem = circumradius * np.cos(np.pi / sides)
    inside = np.ones(u.shape, bool)
    for k in range(sides):  # loop over edges, vectorised over all pixels
        angle = first_normal + 2 * np.pi * k / sides
        inside &= u * np.cos(angle) + v * np.sin(angle) <= apothem
    return inside


def _circle(u, v):
    return u * u + v * v <= 0.85**2


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.72


def _triangle(u, v):
    # apex up (-v); edge normals point down and to the upper left/right
    return _regular_polygon(u, v, 3, 1.0, np.pi / 2)


def _star(u, v, points: int = 5, inner: float = 0.45):
    radius = np.hypot(u, v)
    sector = 2 * np.pi / points
    # angle from an outer tip (first tip points up), folded into [0, sector / 2]
    angle = sector * _fraction((np.arctan2(v, u) + np.pi / 2) / sector)
    angle = np.minimum(angle, sector - angle)
    # the edge runs from the tip (1, 0) to the inner vertex at angle sector / 2
    tip = np.array([1.0, 0.0])
    notch = inner * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    edge = notch - tip
    normal = np.array([-edge[1], edge[0]])
    normal *= np.sign(normal @ tip)
    return radius * (np.cos(angle) * normal[0] + np.sin(angle) * normal[1]) <= normal @ tip


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.9)) | ((av <= 0.3) & (au <= 0.9))


def _ring(u, v):
    squared = u * u + v * v
    return (squared <= 0.9**2) & (squared >= 0.5**2)


_SHAPE_PREDICATES: Dict[str, Callable] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
}

_PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (160, 40, 200),
    "orange": (250, 130, 0),
    "white": (245, 245, 245),
}

# texture name -> range of its period (fraction of the image side)
_TEXTURE_PERIODS: Dict[str, Tuple[float, float]] = {
    "plain": (1.0, 1.0),
    "striped": (0.09, 0.16),
    "dotted": (0.10, 0.16),
    "checkered": (0.07, 0.13),
    "noisy": (1.0, 1.0),
    "wavy": (0.10, 0.16),
}


def _pixel_grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [0, 1] as broadcastable ``x [1, 1, S]`` and ``y [1, S, 1]``;
    all geometry is relative, so other sizes rescale."""
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    return coords[None, None, :], coords[None, :, None]


def _column(values: np.ndarray) -> np.ndarray:
    """One value per image as float32 ``[B, 1, 1]``."""
    return values.astype(np.float32)[:, None, None]


def draw_shapes(shape_ids: np.ndarray, centres: np.ndarray, radii: np.ndarray, rotations: np.ndarray,
                size: int) -> np.ndarray:
    """bool ``[B, S, S]``: the pixels inside each image's shape (kind ``shape_ids``
    in ``SHAPE_PREDICATES`` order, centre ``(x, y)``, radius, rotation)."""
    x, y = _pixel_grid(size)
    # local coordinates in units of the radius, rotated
    radius = _column(radii)
    dx = (x - _column(centres[:, 0])) / radius
    dy = (y - _column(centres[:, 1])) / radius
    cos, sin = np.cos(_column(rotations)), np.sin(_column(rotations))
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    shape_mask = np.zeros((len(shape_ids), size, size), bool)
    for shape_id, predicate in enumerate(_SHAPE_PREDICATES.values()):  # loop over kinds
        members = np.flatnonzero(shape_ids == shape_id)
        if members.size:
            shape_mask[members] = predicate(u[members], v[members])
    return shape_mask


def draw_textures(texture_ids: np.ndarray, periods: np.ndarray, angles: np.ndarray, phases: np.ndarray,
                  size: int, seed: int, image_index: np.ndarray) -> np.ndarray:
    """float32 ``[B, S, S]`` background patterns in [0, 1] (0: first tone, 1: second)
    of the textures ``texture_ids`` (``TEXTURE_PERIODS`` order); the noisy texture's
    pixels depend on ``(seed, image_index)``."""
    x, y = _pixel_grid(size)
    pattern = np.zeros((len(texture_ids), size, size), np.float32)
    period = _column(periods)
    angle = _column(angles)
    phase_x, phase_y = _column(phases[:, 0]), _column(phases[:, 1])
    for texture_id, texture in enumerate(_TEXTURE_PERIODS):
        members = np.flatnonzero(texture_ids == texture_id)
        if not members.size or texture == "plain":
            continue
        p, a = period[members], angle[members]
        px, py = phase_x[members], phase_y[members]
        if texture == "striped":
            across = (x * np.cos(a) + y * np.sin(a)) / p + px
            pattern[members] = _fraction(across) < 0.5
        elif texture == "wavy":
            along = -x * np.sin(a) + y * np.cos(a)
            across = (x * np.cos(a) + y * np.sin(a) + 0.35 * p * np.sin(2 * np.pi * along / (2.5 * p))) / p
            pattern[members] = _fraction(across + px) < 0.5
        elif texture == "dotted":
            gx = _fraction(x / p + px) - 0.5
            gy = _fraction(y / p + py) - 0.5
            pattern[members] = gx * gx + gy * gy < 0.28**2
        elif texture == "checkered":
            cells_x = np.floor(x / p + px).astype(np.int64)
            cells_y = np.floor(y / p + py).astype(np.int64)
            pattern[members] = ((cells_x + cells_y) & 1).astype(bool)
        elif texture == "noisy":
            pixel = np.arange(size * size, dtype=np.uint64).reshape(1, size, size)
            index = image_index[members].astype(np.uint64)[:, None, None]
            pattern[members] = _uniform(seed, _STREAM_PIXEL_NOISE, index, pixel)
        else:  # pragma: no cover - guarded by _TEXTURE_PERIODS
            raise AssertionError(texture)
    return pattern


def compose(pattern: np.ndarray, shape_mask: np.ndarray, tone_a: np.ndarray, tone_b: np.ndarray,
            colours: np.ndarray) -> np.ndarray:
    """uint8 ``[B, S, S, 3]``: the background mixes the tones ``[B, 3]`` by
    ``pattern``; the shape pixels take ``colours`` (uint8 ``[B, 3]``)."""
    size = pattern.shape[-1]
    # compose channel planes (contiguous, fast); +0.5 then truncation = rounding,
    # tones stay inside [13, 150] by construction so no clipping is needed
    tone_a = tone_a.astype(np.float32)
    tone_step = tone_b.astype(np.float32) - tone_a
    foreground = colours.astype(np.float32) + 0.5
    planes = np.empty((len(pattern), 3, size, size), np.float32)
    for channel in range(3):
        plane = planes[:, channel]
        np.multiply(pattern, tone_step[:, channel, None, None], out=plane)
        plane += tone_a[:, channel, None, None] + 0.5
        np.copyto(plane, foreground[:, channel, None, None], where=shape_mask)
    channels = planes.astype(np.uint8)
    # np.stack interleaves channels ~6x faster than a transposed copy
    return np.stack([channels[:, 0], channels[:, 1], channels[:, 2]], axis=-1)
