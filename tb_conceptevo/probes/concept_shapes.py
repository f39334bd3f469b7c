"""ConceptShapes: the embedded, procedural probe set with ground-truth concepts.

Every image is one coloured shape on a textured, greyish background.  Image ``i``
is a pure function of ``(seed, i, size)``: its parameters come from a counter-based
hash (SplitMix64) of ``(seed, parameter stream, i)``, so any subset, in any order,
is reproducible and generation is vectorised over images (no per-image loop).
Changing ``n`` only appends or drops images; ``ConceptShapes(n=4000, seed=1)``
makes a training set drawn from the same distribution as, but with other images
than, the probe set ``ConceptShapes(n=1024, seed=0)``.

Class label (``probe[i][1]``, :attr:`ConceptShapes.labels`): the **shape** index in
:attr:`ConceptShapes.SHAPES` by default (``label="colour"`` or ``label="texture"``
to train on another factor); colour, texture, position and scale are nuisances, so
shape classification is learnable in minutes on a CPU but not trivial.
``label_noise=p`` replaces a fraction ``p`` of the labels with a uniformly drawn
class (deterministically), the images are unchanged.

Concept vocabulary (:attr:`ConceptShapes.vocabulary`, 26 concepts, in this order):

==========  ==================================================  ==================
category    concepts                                            pixel mask
==========  ==================================================  ==================
shape       circle, square, triangle, star, cross, ring         shape pixels
colour      red, green, blue, yellow, purple, orange, white     shape pixels
texture     plain, striped, dotted, checkered, noisy, wavy      background pixels
position    left, right, top, bottom, centre                    shape pixels
size        small, large                                        shape pixels
==========  ==================================================  ==================

Every image has exactly one shape, one colour and one texture concept.  Position
concepts come from the shape centre ``(cx, cy)`` in ``[0, 1]``: ``left`` when
``cx < 1/3``, ``right`` when ``cx > 2/3``, ``top`` when ``cy < 1/3``, ``bottom`` when
``cy > 2/3`` and ``centre`` when both lie in the middle third (so an image has 0-2 of
them).  Size concepts come from the shape radius ``r`` (fraction of the image side,
drawn in ``[0.14, 0.30]``): ``small`` when ``r < 0.18``, ``large`` when ``r > 0.25``.
The ring's hole belongs to the background (texture mask), not to the shape.

Shapes are flat-coloured (a per-image brightness factor in ``[0.82, 1]`` times the
palette colour) and not anti-aliased, so masks are exact.  Backgrounds are two
greyish tones (values <= 137, small tint) mixed by the texture pattern, far from
every shape colour.

Example:
    >>> probe = ConceptShapes(n=16, size=64, seed=0)
    >>> image, label = probe[3]
    >>> tuple(image.shape), probe.class_names[label] == probe.SHAPES[probe.shape_ids[3]]
    ((3, 64, 64), True)
    >>> probe.masks([0, 1]).shape == (2, len(probe.vocabulary), 64, 64)
    True
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._counter_random import (  # noqa: F401 - _splitmix64: re-exported
    _STREAM_ANGLE, _STREAM_BRIGHTNESS, _STREAM_COLOUR, _STREAM_CONTRAST, _STREAM_CX, _STREAM_CY, _STREAM_GREY,
    _STREAM_NOISE_CLASS, _STREAM_NOISY_LABEL, _STREAM_PERIOD, _STREAM_PHASE_X, _STREAM_PHASE_Y, _STREAM_RADIUS,
    _STREAM_ROTATION, _STREAM_SHAPE, _STREAM_TEXTURE, _STREAM_TINT_B, _STREAM_TINT_G, _STREAM_TINT_R,
    _splitmix64, _uniform,
)
from ._shape_drawing import (  # noqa: F401 - _PALETTE, _SHAPE_PREDICATES, _TEXTURE_PERIODS: re-exported
    _PALETTE, _SHAPE_PREDICATES, _TEXTURE_PERIODS, compose, draw_shapes, draw_textures,
)
from .base import ConceptVocabulary, ProbeSet
from .hashing import content_hash

IndexLike = Union[int, Sequence[int], np.ndarray, torch.Tensor]

_RADIUS_RANGE = (0.14, 0.30)
_SMALL_BELOW, _LARGE_ABOVE = 0.18, 0.25
_MAX_ROTATION = np.deg2rad(20.0)
_RENDER_CHUNK = 128  # images rendered at once: bounds temporary memory (~30 MB at 64 px)


class ConceptShapes(ProbeSet):
    """Procedural probe/training set: a coloured shape on a textured background.

    Args:
        n: number of images.
        size: image side in pixels (square images; >= 16).
        seed: non-negative int; image ``i`` depends only on ``(seed, i, size)``.
        transform: optional callable applied to the float ``[3, H, W]`` image in
            ``[0, 1]`` by ``__getitem__`` and :meth:`images` (e.g. ``Normalize``).
        label: factor used as class label: ``"shape"`` (default), ``"colour"`` or
            ``"texture"``.
        label_noise: fraction in ``[0, 1]`` of labels replaced by a random class.
        cache: render all images once (uint8, ``n * size * size * 3`` bytes plus a
            bool shape mask) on first use; with ``False`` every call renders the
            requested images only (same bytes, less memory).
        progress: tqdm bar while rendering the cache (default: when ``n >= 20000``).

    Example:
        >>> train = ConceptShapes(n=4000, seed=1)           # demo training set
        >>> probe = ConceptShapes(n=1024, seed=0)           # probe set
        >>> probe.raw_images([0, 5]).shape, probe.raw_images([0, 5]).dtype
        ((2, 64, 64, 3), dtype('uint8'))
        >>> probe.vocabulary.categories[probe.vocabulary.index("striped")]
        'texture'
    """

    SHAPES: Tuple[str, ...] = tuple(_SHAPE_PREDICATES)
    COLOURS: Tuple[str, ...] = tuple(_PALETTE)
    TEXTURES: Tuple[str, ...] = tuple(_TEXTURE_PERIODS)
    POSITIONS: Tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
    SIZES: Tuple[str, ...] = ("small", "large")
    LABELS: Tuple[str, ...] = ("shape", "colour", "texture")

    def __init__(
        self,
        n: int = 1024,
        size: int = 64,
        seed: int = 0,
        transform: Optional[Callable] = None,
        label: str = "shape",
        label_noise: float = 0.0,
        cache: bool = True,
        progress: Optional[bool] = None,
    ):
        for name, value, minimum in (("n", n, 1), ("size", size, 16), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"ConceptShapes: {name} must be an int >= {minimum}, got {value!r}")
        if seed >= 2**63:
            raise ValueError(f"ConceptShapes: seed must be < 2**63, got {seed}")
        if label not in self.LABELS:
            raise ValueError(f"ConceptShapes: label must be one of {self.LABELS}, got {label!r}")
        if not 0.0 <= float(label_noise) <= 1.0:
            raise ValueError(f"ConceptShapes: label_noise must be in [0, 1], got {label_noise!r}")
        self.n, self.size, self.seed = int(n), int(size), int(seed)
        self.transform = transform
        self.label = label
        self.label_noise = float(label_noise)
        self.cache = bool(cache)
        self.progress = self.n >= 20000 if progress is None else bool(progress)
        self._draw_parameters()
        self._images: Optional[np.ndarray] = None
        self._shape_masks: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ parameters
    def _draw_parameters(self) -> None:
        """All per-image parameters, vectorised over the ``n`` images (cheap)."""
        index = np.arange(self.n, dtype=np.uint64)

        def draw(stream):
            return _uniform(self.seed, stream, index)

        def pick(stream, count):
            return np.minimum((draw(stream) * count).astype(np.int64), count - 1)

        self.shape_ids = pick(_STREAM_SHAPE, len(self.SHAPES))
        self.colour_ids = pick(_STREAM_COLOUR, len(self.COLOURS))
        self.texture_ids = pick(_STREAM_TEXTURE, len(self.TEXTURES))
        low, high = _RADIUS_RANGE
        self.radii = low + (high - low) * draw(_STREAM_RADIUS)
        margin = 1.05 * self.radii  # keeps the whole shape inside the image
        self.centres = np.stack(
            [margin + (1 - 2 * margin) * draw(_STREAM_CX), margin + (1 - 2 * margin) * draw(_STREAM_CY)],
            axis=1,
        )
        self.rotations = _MAX_ROTATION * (2 * draw(_STREAM_ROTATION) - 1)

        brightness = 0.82 + 0.18 * draw(_STREAM_BRIGHTNESS)
        palette = np.array(list(_PALETTE.values()), np.float64)
        self.shape_colours = np.round(palette[self.colour_ids] * brightness[:, None]).astype(np.uint8)

        # two greyish background tones: a dark/mid grey with a small tint, and a
        # lighter or darker second tone for the texture pattern
        grey = 35 + 90 * draw(_STREAM_GREY)
        tint = np.stack([draw(s) for s in (_STREAM_TINT_R, _STREAM_TINT_G, _STREAM_TINT_B)], axis=1)
        self._tone_a = grey[:, None] + 24 * (tint - 0.5)
        delta = 35 + 20 * draw(_STREAM_CONTRAST)
        self._tone_b = self._tone_a + np.where(grey < 80, delta, -delta)[:, None]

        period_low = np.array([_TEXTURE_PERIODS[t][0] for t in self.TEXTURES])[self.texture_ids]
        period_high = np.array([_TEXTURE_PERIODS[t][1] for t in self.TEXTURES])[self.texture_ids]
        self._periods = period_low + (period_high - period_low) * draw(_STREAM_PERIOD)
        self._angles = np.pi * draw(_STREAM_ANGLE)
        self._phases = np.stack([draw(_STREAM_PHASE_X), draw(_STREAM_PHASE_Y)], axis=1)

        factor = {"shape": self.shape_ids, "colour": self.colour_ids, "texture": self.texture_ids}[self.label]
        n_classes = len(self.class_names)
        noisy = draw(_STREAM_NOISY_LABEL) < self.label_noise
        random_class = pick(_STREAM_NOISE_CLASS, n_classes)
        self._labels = np.where(noisy, random_class, factor).astype(np.int64)

        self._presence = self._concept_presence_table()

    def _concept_presence_table(self) -> np.ndarray:
        """bool ``[n, C]`` ground-truth presence of every vocabulary concept."""
        n = self.n
        one_hot = lambda ids, count: np.eye(count, dtype=bool)[ids]  # noqa: E731
        cx, cy = self.centres[:, 0], self.centres[:, 1]
        middle_x = (cx >= 1 / 3) & (cx <= 2 / 3)
        middle_y = (cy >= 1 / 3) & (cy <= 2 / 3)
        position = np.stack([cx < 1 / 3, cx > 2 / 3, cy < 1 / 3, cy > 2 / 3, middle_x & middle_y], axis=1)
        size = np.stack([self.radii < _SMALL_BELOW, self.radii > _LARGE_ABOVE], axis=1)
        table = np.concatenate(
            [
                one_hot(self.shape_ids, len(self.SHAPES)),
                one_hot(self.colour_ids, len(self.COLOURS)),
                one_hot(self.texture_ids, len(self.TEXTURES)),
                position,
                size,
            ],
            axis=1,
        )
        assert table.shape == (n, len(self.vocabulary))
        return table

    # ------------------------------------------------------------------ rendering
    def _render(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 ``[B, S, S, 3]`` images and bool ``[B, S, S]`` shape masks."""
        images = np.empty((len(indices), self.size, self.size, 3), np.uint8)
        masks = np.empty((len(indices), self.size, self.size), bool)
        for start in range(0, len(indices), _RENDER_CHUNK):
            chunk = indices[start:start + _RENDER_CHUNK]
            images[start:start + len(chunk)], masks[start:start + len(chunk)] = self._render_chunk(chunk)
        return images, masks

    def _render_chunk(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        shape_mask = draw_shapes(self.shape_ids[indices], self.centres[indices], self.radii[indices],
                                 self.rotations[indices], self.size)
        pattern = draw_textures(self.texture_ids[indices], self._periods[indices], self._angles[indices],
                                self._phases[indices], self.size, self.seed, indices)
        images = compose(pattern, shape_mask, self._tone_a[indices], self._tone_b[indices],
                         self.shape_colours[indices])
        return images, shape_mask

    def _ensure_cache(self) -> None:
        if self._images is not None:
            return
        indices = np.arange(self.n)
        if self.progress:
            from tqdm.auto import tqdm

            images = np.empty((self.n, self.size, self.size, 3), np.uint8)
            masks = np.empty((self.n, self.size, self.size), bool)
            for start in tqdm(range(0, self.n, _RENDER_CHUNK), desc="rendering ConceptShapes"):
                stop = min(self.n, start + _RENDER_CHUNK)
                images[start:stop], masks[start:stop] = self._render_chunk(indices[start:stop])
            self._images, self._shape_masks = images, masks
        else:
            self._images, self._shape_masks = self._render(indices)

    def _fetch(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if self.cache:
            self._ensure_cache()
            return self._images[indices], self._shape_masks[indices]
        return self._render(indices)

    def _index_array(self, indices: IndexLike) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        array = np.asarray(indices)
        if array.ndim == 0:
            array = array.reshape(1)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise TypeError(f"indices must be a 1-D sequence of ints, got {array.dtype} {array.shape}")
        array = array.astype(np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.n):
            raise IndexError(f"indices must be in [0, {self.n}); got min {array.min()}, max {array.max()}")
        return array

    # ------------------------------------------------------------------ ProbeSet API
    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"ConceptShapes index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.n
        raw = self.raw_images([index])[0]
        image = torch.from_numpy(raw).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self._labels[index])

    def images(self, indices: IndexLike) -> torch.Tensor:
        """float32 ``[B, 3, H, W]`` batch, the same as stacking ``probe[i][0]``.

        Faster than a DataLoader for the recorder: one slice of the cache.
        """
        index_array = self._index_array(indices)
        batch = torch.from_numpy(self.raw_images(index_array)).permute(0, 3, 1, 2).float().div_(255.0)
        if self.transform is not None:
            batch = torch.stack([self.transform(image) for image in batch])
        return batch

    def load_batch(self, indices: IndexLike) -> torch.Tensor:
        """The recorder's batch loader (see ``ProbeSet.load_batch``): :meth:`images`."""
        return self.images(indices)

    def raw_images(self, indices: IndexLike) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` untransformed images."""
        return self._fetch(self._index_array(indices))[0]

    def shape_masks(self, indices: IndexLike) -> np.ndarray:
        """bool ``[B, H, W]``: the shape's pixels (the complement is background)."""
        return self._fetch(self._index_array(indices))[1]

    @property
    def hash(self) -> str:
        return content_hash(self)

    def _content_chunk(self, indices: np.ndarray) -> np.ndarray:
        return self.raw_images(indices)

    @property
    def image_size(self) -> Tuple[int, int]:
        return (self.size, self.size)

    @property
    def class_names(self) -> List[str]:
        return list({"shape": self.SHAPES, "colour": self.COLOURS, "texture": self.TEXTURES}[self.label])

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    @property
    def vocabulary(self) -> ConceptVocabulary:
        if getattr(self, "_vocabulary", None) is None:
            self._vocabulary = self._build_vocabulary()
        return self._vocabulary

    def _build_vocabulary(self) -> ConceptVocabulary:
        groups = (
            ("shape", self.SHAPES),
            ("colour", self.COLOURS),
            ("texture", self.TEXTURES),
            ("position", self.POSITIONS),
            ("size", self.SIZES),
        )
        names = tuple(name for _, members in groups for name in members)
        categories = tuple(category for category, members in groups for _ in members)
        return ConceptVocabulary(names, categories)

    @property
    def has_masks(self) -> bool:
        return True

    def masks(self, indices: IndexLike) -> torch.Tensor:
        """bool ``[B, C, H, W]`` concept masks (``C = len(vocabulary)``).

        Texture concepts cover the background pixels, all other concepts the shape
        pixels; absent concepts are all False.  On the device of ``indices`` when it
        is a tensor.
        """
        index_array = self._index_array(indices)
        shape_mask = torch.from_numpy(self.shape_masks(index_array))
        presence = torch.from_numpy(self._presence[index_array])
        on_background = torch.tensor([c == "texture" for c in self.vocabulary.categories])
        region = torch.where(
            on_background[None, :, None, None], ~shape_mask[:, None], shape_mask[:, None]
        )
        masks = presence[:, :, None, None] & region
        return masks.to(indices.device) if isinstance(indices, torch.Tensor) else masks

    def mask_codes(self, indices: IndexLike) -> torch.Tensor:
        """int64 ``[B, H, W]``: :meth:`masks` packed into bits (bit c = concept c).

        A pixel carries the image's texture concepts on the background and all its
        other present concepts on the shape, so two codes per image suffice.
        """
        index_array = self._index_array(indices)
        shape_mask = torch.from_numpy(self.shape_masks(index_array))
        bits = torch.tensor([1 << c for c in range(len(self.vocabulary))], dtype=torch.int64)
        on_background = torch.tensor([c == "texture" for c in self.vocabulary.categories])
        presence = torch.from_numpy(self._presence[index_array]).to(torch.int64)       # [B, C] 0/1
        background_code = (presence * bits * on_background).sum(dim=1)
        shape_code = (presence * bits * ~on_background).sum(dim=1)
        codes = torch.where(shape_mask, shape_code[:, None, None], background_code[:, None, None])
        return codes.to(indices.device) if isinstance(indices, torch.Tensor) else codes

    def concept_presence(self, indices: IndexLike) -> torch.Tensor:
        """float32 ``[B, C]``: 1 where the concept is in the image, else 0.

        Example:
            >>> probe = ConceptShapes(n=4)
            >>> probe.concept_presence([0])[0, :6].sum().item()   # exactly one shape
            1.0
        """
        presence = torch.from_numpy(self._presence[self._index_array(indices)]).float()
        return presence.to(indices.device) if isinstance(indices, torch.Tensor) else presence

    def annotations(self, index: int) -> Dict[str, object]:
        """Ground truth of one image: names of its shape, colour, texture, the list of
        all present concepts, the shape centre ``(x, y)`` and radius (fractions of the
        side) and the class label."""
        i = int(self._index_array([index])[0])
        present = [name for name, flag in zip(self.vocabulary.names, self._presence[i]) if flag]
        return {
            "shape": self.SHAPES[self.shape_ids[i]],
            "colour": self.COLOURS[self.colour_ids[i]],
            "texture": self.TEXTURES[self.texture_ids[i]],
            "concepts": present,
            "centre": tuple(float(c) for c in self.centres[i]),
            "radius": float(self.radii[i]),
            "label": int(self._labels[i]),
        }

    def __repr__(self) -> str:
        return (
            f"ConceptShapes(n={self.n}, size={self.size}, seed={self.seed}, label={self.label!r}, "
            f"label_noise={self.label_noise})"
        )
