"""Pure functions from decoded payloads to the answers of ``docs/http_api.md``.

No I/O here: the handlers in :mod:`.plugin` read through :class:`.store.Store` and
call these, which keeps every answer's shape testable on plain numpy arrays.
"""

from __future__ import annotations

import io
import re
import struct
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..format import metadata
from ..observation import patch_boxes
from ..format.summary import PayloadError

#: The per-step kinds whose steps make up a run's ``steps``.
_STEP_KINDS = (metadata.STIMULI, metadata.SPACE, metadata.DETECTOR)


def natural_key(name: str):
    """Sort ``features.2`` before ``features.10``.

    >>> sorted(["features.10", "features.2", "classifier"], key=natural_key)
    ['classifier', 'features.2', 'features.10']
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------- /runs

def run_summary(run: str, tags: Mapping[str, Sequence[object]], probe_hash: Optional[str]) -> Dict:
    """Menus of one run from ``{tag: [datum]}`` (only steps and tag names are used)."""
    layers, steps = set(), set()
    spaces: Dict[str, Dict[str, List[int]]] = {}
    detectors: Dict[str, Dict[str, List[int]]] = {}
    importance, revert, anchors = [], [], []
    for tag, data in tags.items():
        parsed = metadata.parse_tag(tag)
        if parsed is None or not data:
            continue
        kind, quals, layer = parsed
        tag_steps = sorted({int(d.step) for d in data})
        if kind in _STEP_KINDS:
            layers.add(layer)
            steps.update(tag_steps)
        if kind == metadata.SPACE:
            spaces.setdefault(quals[0], {})[layer] = tag_steps
        elif kind == metadata.DETECTOR:
            detectors.setdefault(quals[0], {})[layer] = tag_steps
        elif kind == metadata.ANCHORS:
            anchors.append(quals[0])
        elif kind == metadata.IMPORTANCE and quals[0].isdigit():
            importance.append({"class": int(quals[0]), "layer": layer, "steps": tag_steps})
        elif kind == metadata.REVERT and quals[0].isdigit():
            revert.append({"class": int(quals[0]), "steps": tag_steps})

    def by_layer(table):
        return {name: dict(sorted(per.items(), key=lambda kv: natural_key(kv[0]))) for name, per in sorted(table.items())}

    return {
        "run": run,
        "probe_hash": probe_hash,
        "layers": sorted(layers, key=natural_key),
        "steps": sorted(steps),
        "spaces": by_layer(spaces),
        "detectors": by_layer(detectors),
        "importance": sorted(importance, key=lambda e: (e["class"], natural_key(e["layer"]))),
        "revert": sorted(revert, key=lambda e: e["class"]),
        "anchors": sorted(anchors),
    }


def runs_answer(summaries: List[Dict], warnings: List[str]) -> Dict:
    """``/runs``: run menus plus the probe-set groups (runs comparable in one map)."""
    groups: Dict[Optional[str], List[str]] = {}
    for summary in summaries:
        groups.setdefault(summary["probe_hash"], []).append(summary["run"])
    return {
        "runs": summaries,
        "probe_groups": [{"probe_hash": h, "runs": runs} for h, runs in groups.items()],
        "comparable": len(groups) <= 1,
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------- /map

def map_bytes(layout: np.ndarray, groups: Optional[np.ndarray]) -> bytes:
    """``uint32 n | float32 layout[n][2] | int32 channel[n] | int32 group[n]``, little-endian.

    >>> blob = map_bytes(np.array([[0.5, 1.0], [np.nan, np.nan]], np.float32), None)
    >>> len(blob), struct.unpack("<I", blob[:4])[0]
    (36, 2)
    """
    layout = np.asarray(layout, dtype="<f4").reshape(-1, 2)
    n = layout.shape[0]
    if groups is None:
        groups = np.full(n, -1, dtype="<i4")
    groups = np.asarray(groups, dtype="<i4").reshape(-1)
    if groups.shape[0] != n:
        raise ValueError(f"groups has {groups.shape[0]} entries for {n} neurons")
    channels = np.arange(n, dtype="<i4")
    return b"".join([struct.pack("<I", n), layout.tobytes(), channels.tobytes(), groups.tobytes()])


def unplaced_count(layout: np.ndarray) -> int:
    return int((~np.isfinite(np.asarray(layout)).all(axis=1)).sum())


# ----------------------------------------------------------------------------- /labels, /categories

def _plain_header(header: Mapping) -> Dict:
    return {k: v for k, v in header.items() if k not in ("arrays", "version", "kind")}


#: arrays of a detector payload the label answers read (older logs lack the optional ones)
LABEL_ARRAYS = ["top_concepts", "top_similarity"]
LABEL_OPTIONAL_ARRAYS = ["interpretable", "null_similarity"]


def interpretable_flags(header: Mapping, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool ``[N]``: the logged flag, or (logs written before it) top similarity > tau."""
    flags = arrays.get("interpretable")
    if flags is not None:
        return np.asarray(flags).astype(bool).reshape(-1)
    sims = np.asarray(arrays["top_similarity"], np.float32)
    threshold = header.get("threshold")
    if threshold is None or sims.ndim != 2 or not sims.shape[1]:
        return np.zeros(sims.shape[0] if sims.ndim else 0, bool)
    return np.nan_to_num(sims[:, 0], nan=-np.inf) > float(threshold)


def labels_answer(header: Mapping, arrays: Mapping[str, np.ndarray]) -> Dict:
    answer = {
        "concepts": list(header.get("concepts", [])),
        "categories": list(header.get("categories", [])),
        "threshold": header.get("threshold"),
        "interpretable_counts": dict(header.get("interpretable_counts", {})),
        "interpretable_fraction": header.get("interpretable_fraction"),
        "top_concepts": np.asarray(arrays["top_concepts"], np.int64),
        "top_similarity": np.asarray(arrays["top_similarity"], np.float32),
        "interpretable": interpretable_flags(header, arrays).tolist(),
    }
    if arrays.get("null_similarity") is not None:
        answer["null_similarity"] = np.asarray(arrays["null_similarity"], np.float32)
    answer.update({k: v for k, v in _plain_header(header).items() if k not in answer})
    return answer


def categories_answer(headers_by_layer: Mapping[str, Mapping]) -> Dict:
    """Interpretable-neuron counts per category per layer (every category of any layer)."""
    layers = sorted(headers_by_layer, key=natural_key)
    categories: List[str] = []
    for layer in layers:
        for name in headers_by_layer[layer].get("categories", []):
            if name not in categories:
                categories.append(name)
    counts = {layer: {c: int(headers_by_layer[layer].get("interpretable_counts", {}).get(c, 0)) for c in categories}
              for layer in layers}
    return {"layers": layers, "categories": categories, "counts": counts}


# ----------------------------------------------------------------------------- /neuron

def stimuli_entries(header: Mapping, arrays: Mapping[str, np.ndarray], channel: int) -> Tuple[List[int], List[float], List[List[int]]]:
    """Images, activations and patch boxes (input pixels) of one neuron (empty slots dropped)."""
    ids = np.asarray(arrays["image_ids"][channel], np.int64)
    keep = ids >= 0
    acts = np.asarray(arrays["activations"][channel], np.float32)[keep]
    positions = np.asarray(arrays["positions"][channel], np.int64)[keep]
    boxes = patch_boxes(positions, tuple(header["map_size"]), tuple(header["input_size"]))
    return ids[keep].tolist(), acts.tolist(), boxes.tolist()


def neuron_stimuli(header, arrays, channel: int) -> List[Dict]:
    images, activations, boxes = stimuli_entries(header, arrays, channel)
    return [{"image": i, "activation": a, "box": b} for i, a, b in zip(images, activations, boxes)]


def trajectory_point(step: int, layout: np.ndarray, channel: int) -> Dict:
    x, y = (float(v) for v in layout[channel])
    if not (np.isfinite(x) and np.isfinite(y)):
        return {"step": step, "x": None, "y": None}
    return {"step": step, "x": x, "y": y}


def label_point(step: int, header: Mapping, arrays: Mapping[str, np.ndarray], channel: int) -> Dict:
    """One step of a neuron's label timeline; ``interpretable`` as in :func:`interpretable_flags`,
    ``null_similarity`` (chance level of the top score) null for older logs."""
    concepts = header.get("concepts", [])
    categories = header.get("categories", [])
    top = np.asarray(arrays["top_concepts"])
    sims = np.asarray(arrays["top_similarity"])
    index = int(top[channel, 0]) if top.shape[1] else -1
    similarity = float(sims[channel, 0]) if sims.shape[1] else float("nan")
    threshold = header.get("threshold")
    nulls = arrays.get("null_similarity")
    null = float(nulls[channel]) if nulls is not None and channel < len(nulls) else float("nan")
    point = {"step": step, "concept": None, "category": None, "similarity": None, "interpretable": False,
             "threshold": threshold, "null_similarity": null if np.isfinite(null) else None}
    if not 0 <= index < len(concepts):
        return point
    finite = bool(np.isfinite(similarity))
    point.update({
        "concept": concepts[index],
        "category": categories[index] if index < len(categories) else None,
        "similarity": similarity if finite else None,
        "interpretable": bool(finite and interpretable_flags(header, arrays)[channel]),
    })
    return point


def neuron_story(run: str, layer: str, channel: int, step: int, header: Mapping, arrays: Mapping[str, np.ndarray],
                 stimuli_steps: Sequence[Tuple[int, Mapping, Mapping]],
                 space_steps: Sequence[Tuple[int, Mapping, Mapping]],
                 label_steps: Sequence[Tuple[int, Mapping, Mapping]]) -> Dict:
    """The ``/neuron`` answer: the neuron's stimuli at ``step`` (``header``/``arrays``),
    and across every logged ``(step, header, arrays)`` its stimuli, place and label
    (steps where the layer had fewer neurons are left out)."""
    invalid = arrays.get("invalid")
    return {
        "id": f"{layer}:{channel}",
        "run": run,
        "layer": layer,
        "channel": channel,
        "step": step,
        "invalid": bool(invalid[channel]) if invalid is not None else False,
        "stimuli": neuron_stimuli(header, arrays, channel),
        "trajectory": [trajectory_point(s, a["layout"], channel)
                       for s, _, a in space_steps if channel < a["layout"].shape[0]],
        "labels": [label_point(s, h, a, channel) for s, h, a in label_steps if channel < a["top_concepts"].shape[0]],
        "stimuli_by_step": [_images_and_boxes(s, h, a, channel)
                            for s, h, a in stimuli_steps if channel < a["image_ids"].shape[0]],
    }


def _images_and_boxes(step: int, header: Mapping, arrays: Mapping[str, np.ndarray], channel: int) -> Dict:
    images, _activations, boxes = stimuli_entries(header, arrays, channel)
    return {"step": step, "images": images, "boxes": boxes}


# ----------------------------------------------------------------------------- importance / revert

def importance_answer(header: Mapping, arrays: Mapping[str, np.ndarray]) -> Dict:
    """Contract fields of ``/importance`` plus every other header field and array."""
    flagged = arrays.get("flagged")
    answer = {
        "class": header.get("class_index"),
        "class_name": header.get("class_name"),
        "from_step": header.get("from_step"),
        "to_step": header.get("to_step"),
        "layer": header.get("layer"),
        "importance": arrays.get("importance"),
        "mean_sensitivity": arrays.get("mean_sensitivity"),
        "flagged": [] if flagged is None else np.flatnonzero(np.asarray(flagged)).tolist(),
    }
    _add_rest(answer, header, arrays)
    return answer


def revert_answer(header: Mapping, arrays: Mapping[str, np.ndarray]) -> Dict:
    answer = {
        "class": header.get("class_index"),
        "class_name": header.get("class_name"),
        "from_step": header.get("from_step"),
        "to_step": header.get("to_step"),
        "bins": header.get("bin_labels"),
        "accuracy_change": arrays.get("mean_change"),
        "accuracy_change_std": arrays.get("std_change"),
        "random_change": header.get("random_mean"),
        "random_change_std": header.get("random_std"),
        "base_accuracy": header.get("baseline_accuracy"),
        "layers": header.get("layers"),
    }
    _add_rest(answer, header, arrays)
    return answer


def _add_rest(answer: Dict, header: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
    # Fields of newer writers pass through unchanged, so the UI can use them early.
    for key, value in _plain_header(header).items():
        answer.setdefault(key, value)
    for key, value in arrays.items():
        answer.setdefault(key, value)


# ----------------------------------------------------------------------------- probe images

def probe_answer(header: Mapping, arrays: Mapping[str, np.ndarray]) -> Dict:
    answer = {k: v for k, v in _plain_header(header).items()}
    labels = arrays.get("labels")
    answer["labels"] = None if labels is None else np.asarray(labels, np.int64)
    for key in ("class_names", "vocabulary"):
        answer.setdefault(key, None)
    return answer


def decode_png(data: bytes) -> np.ndarray:
    """RGB pixels of a logged PNG; :class:`PayloadError` when it is not one (or is
    larger than a thumbnail atlas can be, so a crafted file cannot exhaust memory)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(bytes(data)))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PayloadError(f"thumbnail atlas is not a readable PNG: {exc}") from None
    with image:
        if image.format != "PNG" or image.width * image.height > 64 * 2**20:
            raise PayloadError(f"thumbnail atlas is not a PNG of sensible size ({image.format}, {image.size})")
        try:
            return np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:  # a truncated or corrupt PNG body
            raise PayloadError(f"thumbnail atlas is not a readable PNG: {exc}") from None


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def patch_cell(atlas: np.ndarray, image: int, grid: int, thumbnail_size: Sequence[int]) -> np.ndarray:
    """The thumbnail of probe image ``image`` inside its atlas (row-major cells)."""
    th, tw = thumbnail_size
    cell = image % (grid * grid)
    row, col = divmod(cell, grid)
    if (row + 1) * th > atlas.shape[0] or (col + 1) * tw > atlas.shape[1]:
        raise PayloadError(f"thumbnail atlas of {atlas.shape[1]}x{atlas.shape[0]} px has no cell {cell} of "
                           f"{tw}x{th} px (probe header and atlas disagree)")
    return atlas[row * th:(row + 1) * th, col * tw:(col + 1) * tw]


def crop_box(thumbnail: np.ndarray, box: Sequence[float], image_size: Sequence[int]) -> np.ndarray:
    """Crop ``box`` (x0, y0, x1, y1 in input pixels) from a thumbnail, at least 1 px."""
    th, tw = thumbnail.shape[:2]
    ih, iw = image_size
    x0, y0, x1, y1 = box
    sx, sy = tw / iw, th / ih
    c0 = min(tw - 1, int(np.floor(x0 * sx)))
    r0 = min(th - 1, int(np.floor(y0 * sy)))
    c1 = max(c0 + 1, min(tw, int(np.ceil(x1 * sx))))
    r1 = max(r0 + 1, min(th, int(np.ceil(y1 * sy))))
    return thumbnail[r0:r1, c0:c1]


def anchors_answer(header: Mapping, arrays: Mapping[str, np.ndarray]) -> Dict:
    return {
        "space": header.get("space"),
        "words": list(header.get("words", [])),
        "kind": list(header.get("point_kind", [])),
        "layout": np.asarray(arrays["layout"], np.float32),
    }


def scalars_answer(series: Mapping[str, Iterable[Tuple[int, float]]]) -> Dict:
    """``{"scalars": {tag: [[step, value], ...]}}`` from ``reading.read_all_scalars``."""
    return {"scalars": {tag: [[int(step), value] for step, value in data] for tag, data in sorted(series.items())}}
