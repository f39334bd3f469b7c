"""Domain objects -> ``(header, arrays)`` payloads (the inverse lives in ``reading.py``).

One function per tag kind; the layouts are documented in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import io
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from . import metadata
from ..observation import LayerObservation

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


def layer_observation(header: Dict, arrays: Dict[str, np.ndarray], step: Optional[int]) -> LayerObservation:
    """Decoder of :func:`stimuli_payload`: the :class:`LayerObservation` it encoded."""
    return LayerObservation(
        layer=header["layer"],
        image_ids=arrays["image_ids"].astype(np.int32),
        activations=arrays["activations"].astype(np.float32),
        positions=arrays["positions"].astype(np.int32),
        invalid=arrays["invalid"].astype(bool),
        map_size=tuple(header["map_size"]),
        input_size=tuple(header["input_size"]),
        probe_hash=header.get("probe_hash", ""),
        step=step,
        reduce=header.get("reduce", "max"),
        hook=header.get("hook"),  # absent in logs written before hook points were recorded
    )


def image_links_payload(obs: LayerObservation) -> Payload:
    """Each probe image's most responsive channels of one layer (``obs.image_links``)."""
    links = np.asarray(obs.image_links)
    # uint16 (65535 = none) for every layer up to 65,535 channels
    compact = obs.n_neurons < 65535
    stored = np.where(links < 0, 65535, links).astype(np.uint16) if compact else links.astype(np.int32)
    header = {"kind": "image_links", "layer": obs.layer, "n_images": int(links.shape[0]),
              "k": int(links.shape[1]), "n_neurons": obs.n_neurons, "probe_hash": obs.probe_hash}
    return header, {"neurons": stored}


def embedding_payload(space_name: str, layer: str, embedding, probe_hash: str = "") -> Payload:
    header = {
        "kind": "space", "space": space_name, "layer": layer,
        "n_neurons": int(embedding.vectors.shape[0]), "dim": int(embedding.vectors.shape[1]),
        "n_unplaced": embedding.n_unplaced, "probe_hash": probe_hash,
    }
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


def probe_payload(probe, thumbnail_size: Optional[int] = None) -> Payload:
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


# ----------------------------------------------------------------------------- importance, revert

def _step(value) -> Optional[int]:
    return None if value is None else int(value)


def importance_payload(result, layer: str) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """``(header, arrays)`` of one layer's importance, for :func:`tb_conceptevo.format.summary.pack`
    under the tag ``metadata.importance_tag(result.class_index, layer)`` at step ``to_step``.

    Header: ``kind="importance"``, ``class_index``, ``class_name`` (or null), ``from_step``,
    ``to_step``, ``layer``, ``n_images``, ``n_neurons``, ``n_flagged``.
    Arrays (``[C]`` each): ``importance`` <f4 (Eq. 9; NaN = flagged), ``mean_sensitivity``
    <f4 (NaN = flagged), ``positive_count`` <i4, ``flagged`` |u1 (1 = non-finite S_n).
    """
    metadata.check_name(layer, "layer")
    li = result.layers[layer]
    header = {
        "kind": metadata.IMPORTANCE,
        "class_index": int(result.class_index),
        "class_name": result.class_name,
        "from_step": _step(result.from_step),
        "to_step": _step(result.to_step),
        "layer": layer,
        "n_images": int(result.n_images),
        "n_neurons": li.n_neurons,
        "n_flagged": int(li.flagged.sum()),
    }
    arrays = {
        "importance": li.importance.astype("<f4"),
        "mean_sensitivity": li.mean_sensitivity.astype("<f4"),
        "positive_count": li.positive_count.astype("<i4"),
        "flagged": li.flagged.astype("|u1"),
    }
    return header, arrays


def importance_payloads(result) -> Dict[str, Tuple[Dict, Dict[str, np.ndarray]]]:
    """``{tag: (header, arrays)}`` for every layer of ``result``."""
    return {
        metadata.importance_tag(result.class_index, layer): importance_payload(result, layer)
        for layer in result.layers
    }


def revert_payload(result) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """``(header, arrays)`` of a revert evaluation, for the tag
    ``metadata.revert_tag(result.class_index)`` at step ``to_step``.

    Header: ``kind="revert"``, ``class_index``, ``class_name``, ``from_step``, ``to_step``,
    ``layers`` (row order), ``bin_labels``, ``seeds``, ``n_images``, ``metric``
    (``"top1_accuracy"``), ``baseline_accuracy``, ``random_mean``, ``random_std``.
    Arrays: ``bin_accuracy_change`` <f4 [L, n_bins], ``random_accuracy_change`` <f4
    [L, n_seeds], ``bin_logit_change`` <f4 [L, n_bins], ``random_logit_change`` <f4
    [L, n_seeds], ``bin_sizes`` <i4 [L, n_bins], ``random_sizes`` <i4 [L],
    ``mean_change`` <f4 [n_bins], ``std_change`` <f4 [n_bins].
    """
    for layer in result.layers:
        metadata.check_name(layer, "layer")
    header = {
        "kind": metadata.REVERT,
        "class_index": int(result.class_index),
        "class_name": result.class_name,
        "from_step": _step(result.from_step),
        "to_step": _step(result.to_step),
        "layers": list(result.layers),
        "bin_labels": list(result.bin_labels),
        "seeds": [int(s) for s in result.seeds],
        "n_images": int(result.n_images),
        "metric": "top1_accuracy",
        "baseline_accuracy": float(result.baseline_accuracy),
        "random_mean": float(result.random_mean),
        "random_std": float(result.random_std),
    }
    arrays = {
        "bin_accuracy_change": result.bin_accuracy_change.astype("<f4"),
        "random_accuracy_change": result.random_accuracy_change.astype("<f4"),
        "bin_logit_change": result.bin_logit_change.astype("<f4"),
        "random_logit_change": result.random_logit_change.astype("<f4"),
        "bin_sizes": result.bin_sizes.astype("<i4"),
        "random_sizes": result.random_sizes.astype("<i4"),
        "mean_change": result.mean_change.astype("<f4"),
        "std_change": result.std_change.astype("<f4"),
    }
    return header, arrays
