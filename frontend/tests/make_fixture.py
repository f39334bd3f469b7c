"""Write a small, fully known log directory for the frontend's browser tests and benchmark.

Uses the real writer (``ConceptWriter.add_payload`` with the payload helpers of
``tb_conceptevo``), so TensorBoard reads exactly what training would produce.  The
layouts are synthetic on purpose: neurons sit on a well-spaced grid (so a test can
count drawn points in the pixels), jittered per step (so moving the slider visibly
changes the map), with a few neurons left unplaced.

    python frontend/tests/make_fixture.py OUT_DIR                       # 2 runs x 4 steps x 2 layers
    python frontend/tests/make_fixture.py OUT_DIR --runs 1 --steps 2 --layers 4 --channels 25000   # 100k points

Prints a JSON summary (runs, layers, steps, placed counts, unplaced ids) on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tb_conceptevo.format import metadata  # noqa: E402
from tb_conceptevo.detectors.base import Detection  # noqa: E402
from tb_conceptevo.observation import LayerObservation  # noqa: E402
from tb_conceptevo.format.payloads import anchors_payload, embedding_payload, probe_payload, stimuli_payload  # noqa: E402
from tb_conceptevo.spaces.base import Anchors, Embedding  # noqa: E402
from tb_conceptevo.writer import ConceptWriter  # noqa: E402

SPACE = "conceptevo"
DETECTOR = "netdissect"
IMPORTANCE_CLASS = 0


def unplaced_channels(layer_index: int, channels: int):
    """Layer 1 (the second) loses two neurons at every step: they must be listed, not drawn."""
    if layer_index == 1 and channels > 17:
        return [5, 17]
    return []


def grid_layout(n_total: int, seed_offset: float, step: int, rng: np.random.Generator) -> np.ndarray:
    """Points on a square grid of unit spacing, jittered by up to 0.2 per step (never overlapping)."""
    side = int(math.ceil(math.sqrt(n_total)))
    idx = np.arange(n_total)
    base = np.stack([idx % side, idx // side], axis=1).astype(np.float32)
    angle = 0.9 * step + seed_offset
    jitter = 0.2 * np.stack([np.cos(angle + idx * 0.7), np.sin(angle + idx * 1.3)], axis=1)
    out = base + jitter + rng.normal(0, 0.01, base.shape)
    # One traveller on a row of its own below the grid, from end to end at every step: a
    # step transition has a neuron to follow between two far-apart places.
    out[-1] = [(side - 1) * (step % 2), -1.5]
    return out.astype(np.float32)


def detector_payload(detection: Detection):
    from tb_conceptevo.metrics.anchors import interpretable_counts, interpretable_fraction
    from tb_conceptevo.format.payloads import detection_payload

    return detection_payload(DETECTOR, detection, interpretable_counts(detection), interpretable_fraction(detection))


def write_run(out: str, run: str, run_index: int, probe, steps, layers, channels, k, with_extras: bool):
    rng = np.random.default_rng(1000 + run_index)
    writer = ConceptWriter(os.path.join(out, run), probe=probe, progress=False, max_queue=1000, flush_secs=3600)
    vocab = probe.vocabulary
    concepts, categories = list(vocab.names), list(vocab.categories)
    n_total = sum(channels)
    offsets = np.cumsum([0] + channels)
    summary = {"layers": layers, "placed": {}, "unplaced": []}
    for t, step in enumerate(steps):
        layout_all = grid_layout(n_total, 0.4 * run_index, t, rng)
        for li, (layer, n) in enumerate(zip(layers, channels)):
            ids = rng.integers(0, len(probe), size=(n, k)).astype(np.int32)
            acts = np.sort(rng.random((n, k)).astype(np.float32), axis=1)[:, ::-1].copy()
            positions = rng.integers(0, 16 * 16, size=(n, k)).astype(np.int32)
            obs = LayerObservation(layer=layer, image_ids=ids, activations=acts, positions=positions,
                                   invalid=np.zeros(n, bool), map_size=(16, 16), input_size=probe.image_size,
                                   probe_hash=probe.hash, step=step)
            if t == 0 and li == 0:
                writer._write_probe_once(step)
            header, arrays = stimuli_payload(obs)
            writer.add_payload(metadata.stimuli_tag(layer), header, arrays, step)
            layout = layout_all[offsets[li]:offsets[li + 1]].copy()
            placed = np.ones(n, bool)
            gone = unplaced_channels(li, n)
            placed[gone] = False
            layout[~placed] = np.nan
            vectors = np.where(placed[:, None], layout, np.nan).astype(np.float32)
            groups = np.where(np.arange(n) % 5 == 4, -1, (np.arange(n) + t) % 4).astype(np.int32)
            emb = Embedding(vectors=vectors, layout=layout, placed=placed, groups=groups)
            header, arrays = embedding_payload(SPACE, layer, emb, probe.hash)
            writer.add_payload(metadata.space_tag(SPACE, layer), header, arrays, step)
            if t == 0:
                summary["placed"][layer] = int(placed.sum())
                summary["unplaced"] += [f"{layer}:{c}" for c in gone]
            if with_extras:
                sim = rng.random((n, len(concepts))).astype(np.float32) * 0.12
                # a concept per neuron that drifts with training, so label timelines change
                favourite = (np.arange(n) * 7 + t * (1 + run_index)) % len(concepts)
                # every sixth neuron never gets its boost: its best concept stays below the threshold
                boosted = np.arange(n) % 6 != 5
                sim[np.arange(n)[boosted], favourite[boosted]] += 0.1 + 0.05 * t
                det = Detection(layer=layer, similarity=sim, concepts=concepts, categories=categories, threshold=0.15)
                header, arrays = detector_payload(det)
                writer.add_payload(metadata.detector_tag(DETECTOR, layer), header, arrays, step)
                writer.add_scalar(metadata.scalar_tag("entropy", SPACE, layer), 1.0 + 0.2 * t + 0.1 * li, step)
                writer.add_scalar(metadata.scalar_tag("d_anchor", SPACE, layer), 2.0 - 0.3 * t + 0.1 * run_index, step)
                if t:
                    writer.add_scalar(metadata.scalar_tag("speed", SPACE, layer), 0.5 / t + 0.05 * li, step)
                writer.add_scalar(metadata.scalar_tag("interpretable_fraction", DETECTOR, layer), 0.2 + 0.1 * t, step)
        if t == 0:
            words = ["red", "circle", "striped", "blue", "square"]
            side = int(math.ceil(math.sqrt(n_total)))
            a_layout = np.array([[0.5 + 1.0 * i, side - 0.5] for i in range(len(words))], np.float32)
            anchors = Anchors(words=words, vectors=a_layout.copy(), layout=a_layout,
                              kind=["anchor", "anchor", "anchor", "concept", "concept"])
            header, arrays = anchors_payload(SPACE, anchors)
            writer.add_payload(metadata.anchors_tag(SPACE), header, arrays, step)
        writer.add_scalar("train/loss", 2.3 * math.exp(-0.5 * t) + 0.1 * run_index, step)
        writer.add_scalar("train/accuracy", 1 - math.exp(-0.6 * (t + 1)) - 0.05 * run_index, step)
    if with_extras and len(steps) >= 2:
        write_importance(writer, layers, channels, steps, rng)
    writer.flush()
    writer.close()
    return summary


def write_importance(writer, layers, channels, steps, rng):
    from tb_conceptevo.importance import ImportanceResult, LayerImportance, RevertResult
    from tb_conceptevo.format.payloads import importance_payload, revert_payload

    from_step, to_step = steps[-3] if len(steps) >= 3 else steps[0], steps[-1]
    result_layers = {}
    for layer, n in zip(layers, channels):
        imp = rng.random(n).astype(np.float32)
        flagged = np.zeros(n, bool)
        flagged[-1] = True
        imp[flagged] = np.nan
        sens = (imp - 0.5).astype(np.float32)
        result_layers[layer] = LayerImportance(layer=layer, importance=imp, mean_sensitivity=sens,
                                               positive_count=(np.nan_to_num(imp) * 64).astype(np.int64), flagged=flagged,
                                               nonfinite_count=flagged.astype(np.int64))
    result = ImportanceResult(class_index=IMPORTANCE_CLASS, n_images=64, layers=result_layers, class_name="circle",
                              from_step=from_step, to_step=to_step)
    for layer in layers:
        header, arrays = importance_payload(result, layer)
        writer.add_payload(metadata.importance_tag(IMPORTANCE_CLASS, layer), header, arrays, to_step)
    L = len(layers)
    revert = RevertResult(
        class_index=IMPORTANCE_CLASS, n_images=64, layers=list(layers), bin_labels=["0-25%", "25-50%", "50-75%", "75-100%"],
        seeds=[0, 1, 2], baseline_accuracy=0.82,
        bin_accuracy_change=np.array([[-0.30, -0.12, -0.05, -0.01]] * L, np.float32) + rng.normal(0, 0.02, (L, 4)).astype(np.float32),
        random_accuracy_change=rng.normal(-0.08, 0.02, (L, 3)).astype(np.float32),
        bin_logit_change=np.zeros((L, 4), np.float32), random_logit_change=np.zeros((L, 3), np.float32),
        bin_sizes=np.full((L, 4), 4, np.int64), random_sizes=np.full(L, 4, np.int64), class_name="circle",
        from_step=from_step, to_step=to_step)
    header, arrays = revert_payload(revert)
    writer.add_payload(metadata.revert_tag(IMPORTANCE_CLASS), header, arrays, to_step)


def main(argv=None):
    from tb_conceptevo.probes import ConceptShapes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--channels", type=int, default=0, help="channels per layer (default 16, 24, 32, ...)")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--no-extras", action="store_true", help="only probe, stimuli and layouts (benchmarks)")
    parser.add_argument("--run-names", default="", help="comma-separated run names (default baseline, high_lr, ...)")
    args = parser.parse_args(argv)
    probe = ConceptShapes(n=args.images, size=64, seed=0)
    layers = [f"features.{3 * i}" for i in range(args.layers)]
    channels = [args.channels or 16 + 8 * i for i in range(args.layers)]
    steps = [10 * i for i in range(args.steps)]
    runs = ["baseline", "high_lr", "small_batch", "wide"][: args.runs] if args.runs <= 4 else [f"run{i}" for i in range(args.runs)]
    if args.run_names:
        runs = args.run_names.split(",")
    summary = {"runs": runs, "steps": steps, "space": SPACE, "detector": DETECTOR, "importance_class": IMPORTANCE_CLASS}
    for i, run in enumerate(runs):
        s = write_run(args.out, run, i, probe, steps, layers, channels, args.k, not args.no_extras)
        summary.update(layers=s["layers"], placed=s["placed"], unplaced=s["unplaced"])
    summary["n_placed"] = sum(summary["placed"].values())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
