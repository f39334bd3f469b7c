"""Domain objects -> ``(header, arrays)`` payloads (the inverse lives in ``reading.py``).

One function per tag kind; the layouts are documented in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import io
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from .observation import LayerObservation

Payload = Tuple[Dict, Dict[str, np.ndarray]]

#: thumbnails per atlas image (a 16 x 16 grid)
ATLAS_GRID = 16


def stimuli_payload(obs: LayerObservation) -> Payload:
    cells = obs.map_size[0] * obs.map_size[1]
    # uint16 positions halve the largest array for every map up to 256 x 256.
    positions = obs.positions.astype(np.uint16 if cells <= 65535 else np.int32)
    header = {
        "kind": "stimuli", "layer": obs.layer, "n_neurons": obs.n_neurons, "k": obs.k,
        "map_size": list(obs.map_size), "input_size": list(obs.input_size), "reduce": obs.reduce,
        "probe_hash": obs.probe_hash, "n_invalid": int(obs.invalid.sum()),
    }
    if obs.hook is not None:
        header["hook"] = obs.hook
    arrays = {
        "image_ids": obs.image_ids.astype(np.int32),
        "activations": obs.activations.astype(np.float32),
        "positions": positions,
        "invalid": obs.invalid.astype(np.uint8),
    }
    return header, arrays


def image_links_payload(obs: LayerObservation) -> Payload:
    """Each probe image's most responsive channels of one layer (``obs.image_links``)."""
    links = np.asarray(obs.image_links)
    # uint16 (65535 = none) for every layer up to 65,535 channels
    compact = obs.n_neurons < 65535
    stored = np.where(links < 0, 65535, links).astype(np.uint16) if compact else links.astype(np.int32)
    header = {"kind": "image_links", "layer": obs.layer, "n_images": int(links.shape[0]),
              "k": int(links.shape[1]), "n_neurons": obs.n_neurons, "probe_hash": obs.probe_hash}
    return header, {"neurons": stored}


def embedding_payload(space_name: str, layer: str, embedding, probe_hash: str = "",
                      extra: Optional[Dict] = None) -> Payload:
    header = {
        "kind": "space", "space": space_name, "layer": layer,
        "n_neurons": int(embedding.vectors.shape[0]), "dim": int(embedding.vectors.shape[1]),
        "n_unplaced": embedding.n_unplaced, "probe_hash": probe_hash,
    }
    header.update(extra or {})
    arrays = {
        # float16 halves the payload; the layout (what is drawn) stays float32.
        "vectors": embedding.vectors.astype(np.float16),
        "layout": embedding.layout.astype(np.float32),
        "placed": embedding.placed.astype(np.uint8),
    }
    if embedding.groups is not None:
        arrays["groups"] = embedding.groups.astype(np.int32)
    return header, arrays


def detection_payload(detector_name: str, detection, interpretable_counts: Mapping[str, int],
                      interpretable_fraction: float, top: int = 3) -> Payload:
    """Each neuron's ``top`` concepts and similarities, its interpretable flag and chance
    level, with the layer's interpretable counts (computed by ``metrics.anchors``)."""
    order, best = detection.ranked(top)
    header = {
        "kind": "detector", "detector": detector_name, "layer": detection.layer,
        "concepts": list(detection.concepts), "categories": list(detection.categories),
        "threshold": float(detection.threshold),
        "interpretable_counts": {k: int(v) for k, v in interpretable_counts.items()},
        "interpretable_fraction": float(interpretable_fraction),
    }
    arrays = {"top_concepts": order, "top_similarity": best,
              "interpretable": detection.interpretable().astype(np.uint8)}
    if detection.null_similarity is not None:
        arrays["null_similarity"] = np.asarray(detection.null_similarity, np.float32)
    return header, arrays


def anchors_payload(space_name: str, anchors) -> Payload:
    header = {"kind": "anchors", "space": space_name, "words": list(anchors.words), "point_kind": list(anchors.kind)}
    arrays = {"layout": np.asarray(anchors.layout, np.float32), "vectors": np.asarray(anchors.vectors, np.float16)}
    return header, arrays


def probe_payload(probe, thumbnail_size: Optional[int] = None, batch: int = 256) -> Payload:
    """Probe header plus PNG thumbnail atlases (``ATLAS_GRID`` x ``ATLAS_GRID`` images each)."""
    from PIL import Image

    n = len(probe)
    height, width = probe.image_size
    if thumbnail_size is None:
        thumbnail_size = 64 if n <= 4096 else 32
    scale = min(1.0, thumbnail_size / max(height, width))
    th, tw = max(1, round(height * scale)), max(1, round(width * scale))
    per_atlas = ATLAS_GRID * ATLAS_GRID
    arrays: Dict[str, np.ndarray] = {}
    has_raw = True
    for a, start in enumerate(range(0, n, per_atlas)):
        stop = min(n, start + per_atlas)
        try:
            raw = probe.raw_images(list(range(start, stop)))
        except NotImplementedError:
            has_raw = False
            break
        if (th, tw) != raw.shape[1:3]:
            raw = np.stack([np.asarray(Image.fromarray(img).resize((tw, th), Image.BILINEAR)) for img in raw])
        grid = np.zeros((ATLAS_GRID * th, ATLAS_GRID * tw, 3), np.uint8)
        count = stop - start
        rows = np.arange(count) // ATLAS_GRID
        cols = np.arange(count) % ATLAS_GRID
        tiles = raw.reshape(count, th, tw, 3)
        view = grid.reshape(ATLAS_GRID, th, ATLAS_GRID, tw, 3)
        view[rows, :, cols, :, :] = tiles
        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, format="PNG", optimize=False, compress_level=6)
        arrays[f"atlas_{a}"] = np.frombuffer(buffer.getvalue(), np.uint8)
    if not has_raw:
        arrays = {}
    vocabulary = probe.vocabulary
    labels = probe.labels
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int32)
    header = {
        "kind": "probe", "probe_hash": probe.hash, "n_images": n, "image_size": [height, width],
        "thumbnail_size": [th, tw], "atlas_grid": ATLAS_GRID, "n_atlases": sum(k.startswith("atlas_") for k in arrays),
        "class_names": list(probe.class_names) if probe.class_names is not None else None,
        "class_order": getattr(probe, "class_order", "model") if probe.class_names is not None else None,
        "vocabulary": None if vocabulary is None else {
            "names": list(vocabulary.names), "categories": list(vocabulary.categories)},
        "probe_type": type(probe).__name__,
    }
    return header, arrays
