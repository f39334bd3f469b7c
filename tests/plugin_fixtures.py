"""Logdirs for the plugin tests, written by the real ``ConceptWriter``.

Stimuli and the probe set come from ``add_concepts`` on a small random CNN; spaces,
detectors, anchors, importance and revert payloads are hand-made objects written with
``add_payload`` (in the documented layouts of ``docs/FORMAT.md``), so these tests do
not wait on the spaces / detectors / metrics code.
"""

from __future__ import annotations

import os
import struct
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from tb_conceptevo.format import metadata
from tb_conceptevo.format.payloads import anchors_payload, embedding_payload
from tb_conceptevo.spaces.base import Anchors, Embedding
from tb_conceptevo.writer import ConceptWriter

from .conftest import random_probe

LAYERS = ["features.0", "features.2"]
CHANNELS = {"features.0": 8, "features.2": 16}
SPACE = "conceptevo"
DETECTOR = "netdissect"
CONCEPTS = ["red", "green", "circle", "stripes"]
CATEGORIES = ["colour", "colour", "shape", "texture"]
IMPORTANCE_CLASS = 1


class SmallNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))

    def forward(self, x):
        return self.features(x)


def layout_for(layer: str, step: int, seed: int) -> np.ndarray:
    """Deterministic layout; neuron 1 of every layer is unplaced (NaN)."""
    rng = np.random.default_rng(1000 * seed + 10 * step + LAYERS.index(layer))
    layout = rng.normal(size=(CHANNELS[layer], 2)).astype(np.float32)
    layout[1] = np.nan
    return layout


def embedding_for(layer: str, step: int, seed: int, with_groups: bool) -> Embedding:
    layout = layout_for(layer, step, seed)
    placed = np.isfinite(layout).all(axis=1)
    vectors = np.where(placed[:, None], np.tile(layout, (1, 2)), np.nan).astype(np.float32)
    groups = (np.arange(CHANNELS[layer]) % 3).astype(np.int32) if with_groups else None
    return Embedding(vectors=vectors, layout=layout, placed=placed, groups=groups)


def detector_payload(layer: str, step: int):
    """A NetDissect-like payload: neuron c's best concept is (c + step) % 4, similarity 0.1 + 0.01 c."""
    n = CHANNELS[layer]
    channels = np.arange(n)
    top = np.stack([(channels + step) % 4, (channels + step + 1) % 4, np.full(n, -1)], axis=1).astype(np.int32)
    sim = np.stack([0.1 + 0.01 * channels, 0.05 + 0.0 * channels, np.full(n, np.nan)], axis=1).astype(np.float32)
    top[0] = -1  # neuron 0 has no label at all
    sim[0] = np.nan
    threshold = 0.12
    interpretable = np.nan_to_num(sim[:, 0], nan=-1) > threshold
    counts: Dict[str, int] = {}
    for concept in top[interpretable, 0]:
        counts[CATEGORIES[concept]] = counts.get(CATEGORIES[concept], 0) + 1
    header = {
        "kind": "detector", "detector": DETECTOR, "layer": layer, "concepts": CONCEPTS,
        "categories": CATEGORIES, "threshold": threshold, "interpretable_counts": counts,
        "interpretable_fraction": float(interpretable.mean()),
    }
    return header, {"top_concepts": top, "top_similarity": sim}


def importance_payload(layer: str, from_step: int, to_step: int):
    n = CHANNELS[layer]
    importance = np.linspace(0, 1, n).astype(np.float32)
    flagged = np.zeros(n, np.uint8)
    flagged[2] = 1
    importance[2] = np.nan
    header = {
        "kind": "importance", "class_index": IMPORTANCE_CLASS, "class_name": "class_1",
        "from_step": from_step, "to_step": to_step, "layer": layer, "n_images": 20,
        "n_neurons": n, "n_flagged": 1,
    }
    arrays = {"importance": importance, "mean_sensitivity": (importance - 0.5).astype(np.float32),
              "positive_count": np.round(np.nan_to_num(importance) * 20).astype(np.int32), "flagged": flagged}
    return header, arrays


def revert_payload(from_step: int, to_step: int):
    bins = ["0-25%", "25-50%", "50-75%", "75-100%"]
    n_layers, n_seeds = len(LAYERS), 3
    change = np.array([[-0.3, -0.2, -0.1, 0.0], [-0.25, -0.1, -0.05, 0.0]], np.float32)
    header = {
        "kind": "revert", "class_index": IMPORTANCE_CLASS, "class_name": "class_1", "from_step": from_step,
        "to_step": to_step, "layers": LAYERS, "bin_labels": bins, "seeds": [0, 1, 2], "n_images": 20,
        "metric": "top1_accuracy", "baseline_accuracy": 0.8, "random_mean": -0.05, "random_std": 0.02,
    }
    arrays = {
        "bin_accuracy_change": change, "random_accuracy_change": np.full((n_layers, n_seeds), -0.05, np.float32),
        "bin_logit_change": change * 2, "random_logit_change": np.full((n_layers, n_seeds), -0.1, np.float32),
        "bin_sizes": np.array([[2, 2, 2, 2], [4, 4, 4, 4]], np.int32), "random_sizes": np.array([2, 4], np.int32),
        "mean_change": change.mean(axis=0), "std_change": change.std(axis=0),
    }
    return header, arrays


class _Space:
    """Just enough of a Space for ``anchors_payload``."""

    name = SPACE


def write_run(run_dir: str, steps: List[int], seed: int = 0, probe_seed: int = 0, extras: bool = True) -> Dict[int, object]:
    """One run: stimuli + probe via ``add_concepts``, a space (with groups), a detector,
    ``train/loss``; with ``extras`` also anchors, and importance and revert at the last step."""
    model = SmallNet(seed)
    probe = random_probe(n=40, size=32, seed=probe_seed)
    writer = ConceptWriter(run_dir, probe=probe, layers=LAYERS, k=5, progress=False)
    observations = {}
    try:
        for i, step in enumerate(steps):
            with torch.no_grad():  # "training": move the weights a little between snapshots
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            writer.add_scalar("train/loss", 1.0 / (1 + i), step)
            observation = writer.add_concepts(model, step=step)
            observations[step] = observation
            writer.add_scalar(metadata.scalar_tag("entropy", SPACE, "all"), 0.5 + i, step)
            for layer in LAYERS:
                header, arrays = embedding_payload(SPACE, layer, embedding_for(layer, step, seed, with_groups=True),
                                                   observation.probe_hash)
                writer.add_payload(metadata.space_tag(SPACE, layer), header, arrays, step)
                d_header, d_arrays = detector_payload(layer, step)
                writer.add_payload(metadata.detector_tag(DETECTOR, layer), d_header, d_arrays, step)
            if i == 0 and extras:
                anchors = Anchors(words=["red", "circle", "dog"], vectors=np.eye(3, 4, dtype=np.float32),
                                  layout=np.array([[0, 0], [1, 1], [np.nan, 2]], np.float32),
                                  kind=["anchor", "anchor", "concept"])
                a_header, a_arrays = anchors_payload(SPACE, anchors)
                writer.add_payload(metadata.anchors_tag(SPACE), a_header, a_arrays, step)
        if extras and len(steps) > 1:
            for layer in LAYERS:
                header, arrays = importance_payload(layer, steps[-2], steps[-1])
                writer.add_payload(metadata.importance_tag(IMPORTANCE_CLASS, layer), header, arrays, steps[-1])
            header, arrays = revert_payload(steps[-2], steps[-1])
            writer.add_payload(metadata.revert_tag(IMPORTANCE_CLASS), header, arrays, steps[-1])
    finally:
        writer.close()
    return observations


FUTURE_SPACE = "future"


def write_future_payload(run_dir: str) -> None:
    """A space payload in a newer format version (as a newer tb_conceptevo would write)."""
    import json

    from tensorboard.compat.proto import summary_pb2
    from torch.utils.tensorboard import SummaryWriter

    from tb_conceptevo.format.summary import blob_sequence_summary

    blobs = [json.dumps({"version": 99, "arrays": [], "kind": "space"}).encode()]
    summary = blob_sequence_summary(metadata.space_tag(FUTURE_SPACE, LAYERS[0]), blobs)
    summary.value[0].metadata.plugin_data.content = json.dumps({"version": 99}).encode()
    assert isinstance(summary, summary_pb2.Summary)
    with SummaryWriter(run_dir) as writer:
        writer._get_file_writer().add_summary(summary, 0)


def write_scalars_only(run_dir: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(run_dir) as writer:
        for step in range(3):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)


def record_offsets(path: str) -> List[int]:
    """Start offsets of the TFRecords of an event file (length, crc, data, crc)."""
    offsets, position = [], 0
    with open(path, "rb") as handle:
        data = handle.read()
    while position + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[position:position + 8])
        offsets.append(position)
        position += 12 + length + 4
    return offsets


def truncate_last_record(run_dir: str) -> int:
    """Cut the run's (only) event file in the middle of its last record; returns the new size."""
    (name,) = [n for n in os.listdir(run_dir) if n.startswith("events.out.tfevents")]
    path = os.path.join(run_dir, name)
    last = record_offsets(path)[-1]
    size = os.path.getsize(path)
    new_size = last + (size - last) // 2
    with open(path, "r+b") as handle:
        handle.truncate(new_size)
    return new_size


def write_logdir(root: str) -> Dict[str, object]:
    """The main fixture logdir; returns facts the tests assert against."""
    observations = {
        "baseline": write_run(os.path.join(root, "baseline"), steps=[0, 1, 2], seed=0, probe_seed=0),
        "other_probe": write_run(os.path.join(root, "other_probe"), steps=[0, 5], seed=1, probe_seed=1, extras=False),
        # Without extras the last record is the detector payload of features.2 at step 2.
        "truncated": write_run(os.path.join(root, "truncated"), steps=[0, 1, 2], seed=2, probe_seed=0, extras=False),
    }
    write_future_payload(os.path.join(root, "baseline"))
    write_scalars_only(os.path.join(root, "scalars_only"))
    truncate_last_record(os.path.join(root, "truncated"))
    return {
        "runs": ["baseline", "other_probe", "truncated"],
        "steps": {run: sorted(obs) for run, obs in observations.items()},
        "observations": observations,
        "seeds": {"baseline": 0, "other_probe": 1, "truncated": 2},
    }
