"""Benchmark of the ConceptEvo space (issue 3 targets).

    python benchmarks/bench_space.py                 # fit + embed targets
    python benchmarks/bench_space.py --alignment     # also: layout alignment on a small CNN
    python benchmarks/bench_space.py --dtype         # also: fit cost of float64 (the CPU default) vs float32
    python benchmarks/bench_space.py --indirect      # only: unplaced neurons with/without image links
    python benchmarks/bench_space.py --reference     # only: Step 1.3 vs the reference procedure
    python benchmarks/bench_space.py --ridge         # only: Step 2.1 ridge vs minimum-norm
    python benchmarks/bench_space.py --cold          # only: fit time in fresh processes

Targets: fit (Steps 1 + 2.1) for 4,224 neurons, 12,000 probe images, k = 10 in at
most 60 s on 2 CPU cores; embed + layout transform of 4,224 neurons in at most 1 s.

The observations are synthetic with realistic structure: 12,000 images each showing
a few of 400 concepts (Zipf-distributed frequency) with an intensity; every neuron
detects one or two concepts (polysemantic) with its own image preference and noise;
its stimuli are its top-10 images.  The "later" model is the same detectors with
fresh noise (so its stimuli overlap the base's only partly).

``--alignment`` trains a small CNN on ConceptShapes for a few epochs, records the
probe at several steps, fits the space on the last step and compares the layouts
of consecutive steps (Procrustes disparity, lower = more aligned) between the
stable layout and UMAP fitted independently per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tb_conceptevo.observation import LayerObservation, Observation  # noqa: E402
from tb_conceptevo.spaces.conceptevo import ConceptEvoSpace  # noqa: E402

N_NEURONS, N_IMAGES, K = 4224, 12000, 10


def synthetic_model(seed_noise: int, n_neurons=N_NEURONS, n_images=N_IMAGES, n_concepts=400, k=K,
                    return_concepts=False):
    """Top-k image ids [n_neurons, k] of concept detectors (see module docstring); with
    ``return_concepts`` also every neuron's primary concept."""
    world = np.random.default_rng(0)
    frequency = 1.0 / np.arange(1, n_concepts + 1) ** 0.7
    frequency /= frequency.sum()
    concepts_per_image = world.integers(2, 6, n_images)
    image_of = np.repeat(np.arange(n_images), concepts_per_image)
    concept_of = world.choice(n_concepts, size=image_of.size, p=frequency)
    intensity = np.zeros((n_images, n_concepts), np.float32)
    intensity[image_of, concept_of] = world.uniform(0.3, 1.0, image_of.size)
    primary = world.integers(0, n_concepts, n_neurons)
    secondary = np.where(world.random(n_neurons) < 0.3, world.integers(0, n_concepts, n_neurons), primary)
    noise = np.random.default_rng(seed_noise)
    ids = np.empty((n_neurons, k), np.int32)
    for start in range(0, n_neurons, 512):  # chunks bound memory to 512 x images
        rows = slice(start, min(start + 512, n_neurons))
        preference = np.random.default_rng(1000 + start).uniform(0, 0.3, (n_images, primary[rows].size))
        response = (intensity[:, primary[rows]] + 0.7 * intensity[:, secondary[rows]]) * (1 + preference)
        response += noise.normal(0, 0.05, response.shape).astype(np.float32)
        top = np.argpartition(-response, k, axis=0)[:k]
        order = np.argsort(-np.take_along_axis(response, top, 0), axis=0)
        ids[rows] = np.take_along_axis(top, order, 0).T
    return (ids, primary) if return_concepts else ids


def layer_observations(ids, probe_hash="bench"):
    """Split [N, k] ids into VGG16-like layers (the real VGG16 conv widths)."""
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(widths) == ids.shape[0]
    out, start = {}, 0
    for index, width in enumerate(widths):
        name = f"features.{index}"
        out[name] = LayerObservation(
            layer=name, image_ids=ids[start:start + width], activations=np.zeros((width, ids.shape[1]), np.float32),
            positions=np.zeros((width, ids.shape[1]), np.int32), invalid=np.zeros(width, bool),
            map_size=(7, 7), input_size=(224, 224), probe_hash=probe_hash,
        )
        start += width
    return Observation(layers=out, probe_hash=probe_hash)


def bench_fit_and_embed():
    import torch

    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    t = time.perf_counter()
    base = layer_observations(synthetic_model(seed_noise=1))
    later = layer_observations(synthetic_model(seed_noise=2))
    print(f"synthetic observations built in {time.perf_counter() - t:.1f} s")

    space = ConceptEvoSpace(random_state=0, progress=False)
    t = time.perf_counter()
    space.fit(base)
    total = time.perf_counter() - t
    steps = {k: v for k, v in space.timings_.items() if k != "layout"}
    fit_seconds = sum(steps.values())
    print("fit stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in space.timings_.items()))
    print(f"pairs {space.n_pairs_:,}, covered images {space.n_covered_images_:,}, "
          f"reconstruction error {space.reconstruction_error_:.4f}")
    print(f"fit Steps 1 + 2.1: {fit_seconds:.1f} s (target <= 60 s, ratio {fit_seconds / 60:.2f}) "
          f"{'PASS' if fit_seconds <= 60 else 'FAIL'};  with the UMAP layout (incl. numba JIT): {total:.1f} s")

    # embed + transform the whole "later" model (all layers), first call and warm
    def embed_all():
        return [space.embed(obs) for obs in later.layers.values()]

    t = time.perf_counter()
    first = embed_all()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    again = embed_all()
    warm = time.perf_counter() - t
    placed = sum(int(e.placed.sum()) for e in again)
    same = all(np.array_equal(a.layout, b.layout, equal_nan=True) for a, b in zip(first, again))
    print(f"embed + layout of {N_NEURONS} neurons: first call {cold:.3f} s, warm {warm:.3f} s "
          f"(target <= 1 s, ratio {warm:.2f}) {'PASS' if warm <= 1.0 else 'FAIL'}; placed {placed}/{N_NEURONS}, "
          f"deterministic {same}")
    from tb_conceptevo.metrics import differential_entropy

    layout = np.concatenate([e.layout for e in again])
    print(f"differential entropy of the later model's map: {differential_entropy(layout):.2f} nats "
          f"(paper's VGG16 maps: 1.1-2.1); map extent {np.nanmax(layout, 0) - np.nanmin(layout, 0)}")
    return space


# ------------------------------------------------------------------------ dtype
def bench_dtype(rounds: int = 3):
    """Steps 1 + 2.1 in float64 (the CPU default: the same space on every machine) and
    float32, interleaved in one process; the ratio is the median of the per-round ratios."""
    base = layer_observations(synthetic_model(seed_noise=1))
    seconds = {"float64": [], "float32": []}
    for _ in range(rounds):
        for dtype in seconds:
            space = ConceptEvoSpace(random_state=0, progress=False, dtype=dtype).fit(base)
            seconds[dtype].append(sum(v for k, v in space.timings_.items() if k != "layout"))
    ratios = np.array(seconds["float64"]) / np.array(seconds["float32"])
    print("fit Steps 1 + 2.1 (s): " + ", ".join(f"{d} {np.round(v, 2).tolist()}" for d, v in seconds.items()))
    print(f"float64 / float32 fit time: median ratio {np.median(ratios):.2f} (per round {np.round(ratios, 2).tolist()})")


# ------------------------------------------------------------------------ alignment
def bench_alignment(epochs=4, records_per_epoch=2):
    import torch
    from scipy.spatial import procrustes
    from torch import nn

    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.recording import record
    from tb_conceptevo.spaces.layout import StableLayout

    torch.manual_seed(0)
    train = ConceptShapes(n=3000, size=32, seed=1)
    probe = ConceptShapes(n=1000, size=32, seed=0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(64, len(train.class_names)),
    )
    layers = ["0", "3", "6"]
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    images = train.images(np.arange(len(train)))
    labels = torch.as_tensor(train.labels)
    snapshots = []
    batches = np.array_split(np.arange(len(train)), len(train) // 64)
    record_every = max(1, len(batches) // records_per_epoch)
    step = 0
    t = time.perf_counter()
    for _ in range(epochs):
        for index, batch in enumerate(np.random.default_rng(step).permutation(len(batches))):
            rows = torch.as_tensor(batches[batch])
            model.train()
            loss = nn.functional.cross_entropy(model(images[rows]), labels[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            if step % record_every == 0:
                snapshots.append(record(model, probe, layers=layers, k=10, progress=False, step=step))
    print(f"trained {step} steps, recorded {len(snapshots)} snapshots in {time.perf_counter() - t:.1f} s "
          f"(last loss {loss.item():.3f})")

    space = ConceptEvoSpace(random_state=0, progress=False).fit(snapshots[-1])
    embedded = [np.concatenate([space.embed(s[l]).vectors for l in layers]) for s in snapshots]
    ours = [np.concatenate([space.embed(s[l]).layout for l in layers]) for s in snapshots]
    independent = [StableLayout(random_state=0).fit(v).transform(v) for v in embedded]

    def disparities(layouts):
        values = []
        for a, b in zip(layouts[:-1], layouts[1:]):
            both = np.isfinite(a).all(1) & np.isfinite(b).all(1)
            values.append(procrustes(a[both], b[both])[2])
        return np.array(values)

    def raw_shift(layouts):  # mean movement without any alignment, relative to map size
        values = []
        for a, b in zip(layouts[:-1], layouts[1:]):
            both = np.isfinite(a).all(1) & np.isfinite(b).all(1)
            scale = np.linalg.norm(a[both] - a[both].mean(0), axis=1).mean()
            values.append(np.linalg.norm(a[both] - b[both], axis=1).mean() / scale)
        return np.array(values)

    ours_d, indep_d = disparities(ours), disparities(independent)
    print("Procrustes disparity of consecutive steps (0 = identical up to rotation/scale):")
    print(f"  stable layout (ours):        mean {ours_d.mean():.3f}  per step {np.round(ours_d, 3).tolist()}")
    print(f"  independent UMAP per step:   mean {indep_d.mean():.3f}  per step {np.round(indep_d, 3).tolist()}")
    print(f"  raw movement / map radius:   ours {raw_shift(ours).mean():.3f}, independent {raw_shift(independent).mean():.3f}")
    print(f"alignment: ours better than independent: {'PASS' if ours_d.mean() < indep_d.mean() else 'FAIL'}")


# ------------------------------------------------------------------------ reference
def reference_skipgram(pairs, n_neurons, dim=30, negatives=3, lr=0.05, epochs=20, seed=0):
    """The reference procedure (as the ConceptEvo code trains Step 1.3): one plain SGD
    update of Eq. 2-3 per co-activated pair, pairs in random order, ``negatives``
    uniform negative neurons per side, constant learning rate, uniform init.

    Compiled (numba, one thread, float64): the per-pair procedure at native speed, so
    the ratio measures the method, not the Python interpreter."""
    return _reference_skipgram(np.ascontiguousarray(pairs, dtype=np.int64), int(n_neurons), int(dim),
                               int(negatives), float(lr), int(epochs), int(seed))


def _compiled(function):
    import numba

    return numba.njit(cache=True)(function)


def _reference_skipgram_loop(pairs, n_neurons, dim, negatives, lr, epochs, seed):
    np.random.seed(seed)
    table = np.random.uniform(-0.5, 0.5, (n_neurons, dim))
    va = np.empty(dim)
    vb = np.empty(dim)
    for _ in range(epochs):
        for p in np.random.permutation(pairs.shape[0]):
            a, b = pairs[p, 0], pairs[p, 1]
            va[:] = table[a]
            vb[:] = table[b]
            positive = 1.0 - 1.0 / (1.0 + np.exp(-np.dot(va, vb)))
            step_a = lr * positive * vb
            step_b = lr * positive * va
            for side in range(2):
                own = va if side == 0 else vb
                step = step_a if side == 0 else step_b
                for _n in range(negatives):
                    w = np.random.randint(0, n_neurons)
                    score = 1.0 / (1.0 + np.exp(-np.dot(table[w], own)))
                    step -= lr * score * table[w]
                    table[w] -= lr * score * own
            table[a] += step_a
            table[b] += step_b
    return table


_reference_skipgram = _compiled(_reference_skipgram_loop)


def all_coactivated_pairs(ids):
    """Every pair of neurons sharing a stimulus, once per shared image."""
    neuron, column = np.nonzero(ids >= 0)
    image = ids[neuron, column]
    order = np.argsort(image, kind="stable")
    image, neuron = image[order], neuron[order]
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])
    ends = np.r_[starts[1:], image.size]
    pairs = [np.stack(np.triu_indices(e - s, 1), 1) + s for s, e in zip(starts, ends) if e - s > 1]
    return neuron[np.concatenate(pairs)] if pairs else np.zeros((0, 2), np.int64)


def purity(vectors, labels, k=5):
    """Mean fraction of each vector's k nearest (euclidean) vectors with its label."""
    rows = np.isfinite(vectors).all(1)
    vectors, labels = vectors[rows], labels[rows]
    d = ((vectors[:, None] - vectors[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :k]
    return float((labels[nearest] == labels[:, None]).mean())


def bench_reference(n_neurons=960, n_images=5000, n_concepts=60, settings=((10, 20), (2, 20), (2, 10), (3, 10), (1, 20))):
    """Step 1.3 against the reference procedure on the same synthetic stimuli: time and
    5-NN purity of the neuron embeddings w.r.t. each neuron's primary concept."""
    from tb_conceptevo.spaces.conceptevo import cooccurrence_pairs, sppmi_embeddings, train_skipgram, _uniform_init
    import torch

    ids, concepts = synthetic_model(0, n_neurons=n_neurons, n_images=n_images, n_concepts=n_concepts,
                                    return_concepts=True)
    pairs = all_coactivated_pairs(ids)
    reference_skipgram(pairs[:10], n_neurons, epochs=1)  # compile (or load from the disk cache) first
    t = time.perf_counter()
    reference = reference_skipgram(pairs, n_neurons)
    reference_seconds = time.perf_counter() - t
    reference_purity = purity(reference, concepts)
    print(f"reference: {len(pairs):,} co-activated pairs x 20 epochs in {reference_seconds:.2f} s, "
          f"5-NN purity {reference_purity:.3f}")
    neuron, column = np.nonzero(ids >= 0)
    image = ids[neuron, column]
    valid = (ids >= 0).any(1)
    times, purities = [], []
    for seed in range(3):
        t = time.perf_counter()
        table = sppmi_embeddings(image, neuron, valid, 30, 3, torch.Generator().manual_seed(seed))
        times.append(time.perf_counter() - t)
        purities.append(purity(table, concepts))
    print(f"ours neuron_solver='sppmi' (default): {np.median(times):.3f} s (x{reference_seconds / np.median(times):.1f} "
          f"faster), 5-NN purity {np.mean(purities):.3f} (seeds {np.round(purities, 3).tolist()})")
    for repetitions, epochs in settings:
        times, purities = [], []
        for seed in range(3):
            t = time.perf_counter()
            ours_pairs = cooccurrence_pairs(image, neuron, repetitions, np.random.default_rng(seed))
            generator = torch.Generator().manual_seed(seed)
            table = _uniform_init(n_neurons, 30, generator).double()
            train_skipgram(table, torch.as_tensor(ours_pairs), torch.arange(n_neurons), negatives=3, lr=0.05,
                           epochs=epochs, batch_size=max(32, n_neurons // 2), generator=generator, progress=False)
            times.append(time.perf_counter() - t)
            purities.append(purity(table.numpy(), concepts))
        print(f"ours neuron_solver='sgd' repetitions={repetitions} epochs={epochs}: {len(ours_pairs):,} pairs, "
              f"{np.median(times):.3f} s (x{reference_seconds / np.median(times):.1f} faster), 5-NN purity "
              f"{np.mean(purities):.3f} (seeds {np.round(purities, 3).tolist()})")


# ------------------------------------------------------------------------ ridge
def bench_ridge(n_neurons=960, n_images=5000, n_concepts=60):
    """Step 2.1 solved with the default relative ridge vs the minimum-norm least-squares
    solution (``ridge=0``), measured downstream: reconstruction error, image-embedding
    norms, 5-NN purity of the Step 2.2 vectors (base and a later model: fresh noise),
    differential entropy of the later model's map, evolution speed base -> later."""
    from tb_conceptevo.metrics import differential_entropy

    base_ids, concepts = synthetic_model(0, n_neurons=n_neurons, n_images=n_images, n_concepts=n_concepts,
                                         return_concepts=True)
    later_ids = synthetic_model(1, n_neurons=n_neurons, n_images=n_images, n_concepts=n_concepts)
    obs = LayerObservation(layer="all", image_ids=base_ids, activations=np.zeros(base_ids.shape, np.float32),
                           positions=np.zeros(base_ids.shape, np.int32), invalid=np.zeros(n_neurons, bool),
                           map_size=(7, 7), input_size=(224, 224), probe_hash="bench")
    for ridge in (1e-3, 1e-4, 0.0):
        rows = []
        for seed in range(3):
            t = time.perf_counter()
            space = ConceptEvoSpace(random_state=seed, progress=False, ridge=ridge).fit(obs)
            seconds = space.timings_["image_embeddings"]
            base, _ = space.embed_vectors(base_ids)
            later, _ = space.embed_vectors(later_ids)
            covered = space.image_status_ == 1
            norm = np.linalg.norm(space.image_embeddings_[covered], axis=1).mean()
            layout = space.layout_.transform(later)
            both = np.isfinite(base).all(1) & np.isfinite(later).all(1)
            rows.append([space.reconstruction_error_, norm, purity(base, concepts), purity(later, concepts),
                         differential_entropy(layout), np.linalg.norm(later[both] - base[both], axis=1).mean(),
                         seconds])
        m = np.mean(rows, axis=0)
        print(f"ridge {ridge:g}: reconstruction error {m[0]:.4f}, mean covered-image norm {m[1]:.4f}, 5-NN purity "
              f"base {m[2]:.3f} later {m[3]:.3f}, later-map entropy {m[4]:.3f}, speed base->later {m[5]:.4f}, "
              f"Step 2.1 solve {m[6]:.3f} s (means over 3 seeds)")


# ------------------------------------------------------------------------ cold start
_COLD_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import numpy as np
sys.path.insert(0, sys.argv[1])
from bench_space import synthetic_model
from tb_conceptevo.observation import LayerObservation
from tb_conceptevo.spaces.conceptevo import ConceptEvoSpace
ids = synthetic_model(0, n_neurons=960, n_images=5000, n_concepts=60)
obs = LayerObservation(layer="all", image_ids=ids, activations=np.zeros(ids.shape, np.float32),
                       positions=np.zeros(ids.shape, np.int32), invalid=np.zeros(len(ids), bool),
                       map_size=(7, 7), input_size=(224, 224), probe_hash="bench")
t1 = time.perf_counter()
space = ConceptEvoSpace(random_state=0, progress=False).fit(obs)
t2 = time.perf_counter()
space.embed(obs)
t3 = time.perf_counter()
ConceptEvoSpace(random_state=1, progress=False).fit(obs)
t4 = time.perf_counter()
print(f"start-up {t1 - t0:.1f} s, first fit {t2 - t1:.1f} s (layout {space.timings_['layout']:.1f} s), "
      f"first embed {t3 - t2:.2f} s, second fit {t4 - t3:.1f} s")
"""


def bench_cold():
    """Fit time in fresh processes: with an empty numba cache (cold), then with the
    cache the first process left on disk, and a second fit in the same process (warm)."""
    import subprocess
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.path.join(here, "..") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as cache:
        env["NUMBA_CACHE_DIR"] = cache  # only used where the package folders are not writable
        for label in ("process 1", "process 2"):
            out = subprocess.run([sys.executable, "-c", _COLD_SCRIPT, here], env=env, capture_output=True, text=True)
            print(f"{label}: {out.stdout.strip() or out.stderr.strip()[-500:]}")


# ------------------------------------------------------------------------ indirect
def bench_indirect():
    """Unplaced neurons of a second model embedded in a space fitted on a first one,
    with and without the recorded image links (Step 2.1's indirect embeddings), on the
    demo's CNN (512-image probe, as the demo) and a torchvision resnet18 (random
    weights, all conv layers, a 1,500-image probe at 32 px)."""
    import torch
    import torchvision

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from demo.model import DemoCNN
    from tb_conceptevo.image_links import ImageLinksRecorder, attach_links
    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.recording import record

    only = os.environ.get("BENCH_INDIRECT_ONLY")
    def trained_demo_cnn():
        """The demo CNN after 2 epochs of Adam on 2,000 ConceptShapes images (seed 0);
        with seed 1: its random initialisation (the base is then the trained one)."""
        model = DemoCNN(n_classes=6)
        if torch.initial_seed() == 1:
            return model
        train = ConceptShapes(n=2000, size=32, seed=1)
        images, labels = train.images(np.arange(len(train))), torch.as_tensor(train.labels)
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(2):
            for rows in torch.randperm(len(train)).split(64):
                loss = torch.nn.functional.cross_entropy(model(images[rows]), labels[rows])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        return model

    cases = [("demo CNN", lambda: DemoCNN(n_classes=6), ConceptShapes(n=512, size=32, seed=0)),
             ("demo CNN trained/init", trained_demo_cnn, ConceptShapes(n=512, size=32, seed=0)),
             ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), ConceptShapes(n=1500, size=32, seed=0))]
    for name, make, probe in cases:
        if only and only != name:
            continue
        observations = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = make()
            recorder = ImageLinksRecorder()
            t = time.perf_counter()
            obs = record(model, probe, k=10, consumers=[recorder], progress=False)
            attach_links(obs, recorder.result())
            observations.append(obs)
        print(f"{name}: {observations[0].n_neurons} neurons, {len(probe)} probe images "
              f"(record {time.perf_counter() - t:.1f} s per model)")
        for with_links in (False, True):
            base = observations[0]
            if not with_links:
                base = type(base)(layers={k: _without_links(v) for k, v in base.layers.items()},
                                  step=base.step, probe_hash=base.probe_hash)
            t = time.perf_counter()
            space = ConceptEvoSpace(random_state=0, progress=False).fit(base)
            fit = time.perf_counter() - t
            unplaced = sum(space.embed(o).n_unplaced for o in observations[1].layers.values())
            base_unplaced = sum(space.embed(o).n_unplaced for o in observations[0].layers.values())
            print(f"  {'with' if with_links else 'without'} image links: covered images {space.n_covered_images_}, "
                  f"indirect {space.n_indirect_images_}; unplaced neurons of the other model {unplaced}, "
                  f"of the base {base_unplaced} (fit {fit:.1f} s)")


def _without_links(obs):
    import dataclasses

    return dataclasses.replace(obs, image_links=None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alignment", action="store_true", help="also measure layout alignment on a small CNN")
    parser.add_argument("--only-alignment", action="store_true")
    parser.add_argument("--dtype", action="store_true", help="also compare the fit cost of float64 and float32")
    parser.add_argument("--reference", action="store_true",
                        help="only: Step 1.3 vs the reference procedure (speed ratio, 5-NN purity)")
    parser.add_argument("--cold", action="store_true", help="only: fit time in fresh processes (numba disk cache)")
    parser.add_argument("--ridge", action="store_true", help="only: Step 2.1 ridge vs minimum-norm solution")
    parser.add_argument("--indirect", action="store_true",
                        help="only: unplaced neurons with and without image links (demo CNN, resnet18)")
    args = parser.parse_args()
    if args.indirect:
        return bench_indirect()
    if args.reference:
        return bench_reference()
    if args.ridge:
        return bench_ridge()
    if args.cold:
        return bench_cold()
    if not args.only_alignment:
        bench_fit_and_embed()
    if args.dtype:
        bench_dtype()
    if args.alignment or args.only_alignment:
        bench_alignment()


if __name__ == "__main__":
    main()
