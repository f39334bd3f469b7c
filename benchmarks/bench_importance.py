"""Benchmark of tb_conceptevo.importance (issue: importance of concept evolutions).

1. Speed: importance of every neuron of every conv layer of a VGG-11 (torchvision,
   random weights), 128 images of one class, against one forward + backward pass
   (parameter gradients, as in a training step) over the same images.
   Target: ratio <= 3.
2. Revert evaluation (Sec. 4.4) on a small CNN trained on ConceptShapes (shape
   labels): reverting the most important quartile must lower class accuracy more
   than the least important quartile and more than a random quartile.

Run: ``python benchmarks/bench_importance.py [--size 64] [--skip-revert]``
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tb_conceptevo.importance import concept_evolution_importance, revert_evaluation  # noqa: E402


def best_times(fns, repeats: int):
    """Minimum wall and CPU (process) time of each function.  Runs are interleaved so
    load from other processes on a shared machine affects all of them alike; CPU time
    is the steadier figure when the machine is busy."""
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - start_wall)
            cpu[i].append(time.process_time() - start_cpu)
    return [min(b) for b in wall], [min(b) for b in cpu]


def bench_speed(size: int, n_images: int, batch_size: int, repeats: int) -> bool:
    torch.manual_seed(0)
    model_from = torchvision.models.vgg11(weights=None).eval()
    model_to = torchvision.models.vgg11(weights=None).eval()
    images = torch.randn(n_images, 3, size, size)
    class_index = 7
    n_layers = sum(isinstance(m, nn.Conv2d) for m in model_from.modules())
    n_neurons = sum(m.out_channels for m in model_from.modules() if isinstance(m, nn.Conv2d))

    def forward_backward():
        for batch in images.split(batch_size):
            model_from.zero_grad(set_to_none=True)
            model_from(batch)[:, class_index].sum().backward()

    def importance():
        return concept_evolution_importance(model_from, model_to, images, class_index,
                                            batch_size=batch_size, progress=False)

    forward_backward()  # warm-up (allocator, kernels)
    importance()
    (wall_base, wall_importance), (cpu_base, cpu_importance) = best_times([forward_backward, importance], repeats)
    ratio = wall_importance / wall_base
    cpu_ratio = cpu_importance / cpu_base
    ok = ratio <= 3.0
    print(f"VGG-11 ({n_layers} conv layers, {n_neurons} neurons), {n_images} images of {size} px, "
          f"batch {batch_size}, {torch.get_num_threads()} threads, best of {repeats}")
    print("                              wall      cpu")
    print(f"  forward+backward pass:     {wall_base:7.2f} s {cpu_base:7.2f} s")
    print(f"  importance (all neurons):  {wall_importance:7.2f} s {cpu_importance:7.2f} s")
    print(f"  ratio {ratio:.2f}x wall, {cpu_ratio:.2f}x cpu (target <= 3x): {'PASS' if ok else 'FAIL'}")
    return ok


def bench_revert(epochs: int) -> bool:
    from tb_conceptevo.probes import ConceptShapes

    train = ConceptShapes(n=2000, size=32, seed=1)
    probe = ConceptShapes(n=1024, size=32, seed=0)
    x = train.images(np.arange(len(train)))
    y = torch.from_numpy(train.labels)
    n_classes = len(train.class_names)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, n_classes),
    )
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    snapshots, accuracy = {}, {}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(train), generator=generator).split(50):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            accuracy[epoch] = float((model(x).argmax(1) == y).float().mean())
        snapshots[epoch] = copy.deepcopy(model)
    t, t2 = 1, epochs
    print(f"\nRevert evaluation: CNN 16-32-32 trained {epochs} epochs on ConceptShapes shapes "
          f"({time.perf_counter() - start:.0f} s); train accuracy epoch {t}: {accuracy[t]:.2f}, "
          f"epoch {t2}: {accuracy[t2]:.2f}; probe: 1024 images, every class")
    tables = []
    for class_index in range(n_classes):
        tables.append(revert_evaluation(snapshots[t], snapshots[t2], probe, class_index,
                                        from_step=t, to_step=t2, progress=False))
    mean = np.mean([tab.mean_change for tab in tables], axis=0)
    random_mean = float(np.mean([tab.random_mean for tab in tables]))
    print(f"  accuracy change when reverting epoch {t2} -> {t} (mean over {n_classes} classes, 3 layers):")
    for label, value in zip(tables[0].bin_labels, mean):
        print(f"    {label:>8} most important: {value:+.3f}")
    print(f"    {'random':>8} 25% (5 seeds):  {random_mean:+.3f}")
    ok = mean[0] < random_mean and mean[0] < mean[-1]
    print(f"  top quartile drops more than random and than the bottom quartile: {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs for the revert check")
    parser.add_argument("--skip-revert", action="store_true")
    args = parser.parse_args()
    ok = bench_speed(args.size, args.images, args.batch_size, args.repeats)
    if not args.skip_revert:
        torch.set_num_threads(1)  # tiny CNN: more threads only add contention
        ok = bench_revert(args.epochs) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
