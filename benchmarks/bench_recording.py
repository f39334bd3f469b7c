"""add_concepts vs a bare no-grad forward pass, and peak memory of recording.

Targets: add_concepts wall time / bare forward <= 1.25, same probe and batch size, on
resnet18 and VGG16 (2,048 probe images at 64 px), on the many-layer nets
mobilenet_v3_small, efficientnet_b0 and resnet50 (1,024 images at 64 px) and on
vit_b_16 (256 images at 224 px, its MLP hidden units); peak extra memory with 4,096+
neurons and 10,000 probe images stays O(neurons x k + batch).

    python benchmarks/bench_recording.py [--images 2048] [--deep-images 1024] [--vit-images 256]
                                         [--repeats 3] [--models resnet18,vgg16,mobilenet_v3_small,...]
                                         [--device cuda]

Timings are paired in one process per model (bare, the read-once floor, then
add_concepts, in turn) and the median of each is compared, since shared machines are
noisy; each model gets a fresh process, so the verdicts do not depend on the order of
``--models``.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tb_conceptevo.probes import ConceptShapes  # noqa: E402
from tb_conceptevo.recording import model_device_dtype, point_hooks, resolve_points  # noqa: E402
from tb_conceptevo.writer import ConceptWriter, servable_layers  # noqa: E402


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bare_forward(model, probe, batch_size):
    """The same work without recording: the probe loaded batch by batch onto the
    model's device, one no-grad forward each."""
    device, dtype = model_device_dtype(model)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(probe), batch_size):
            images = probe.load_batch(range(start, min(len(probe), start + batch_size)))
            model(images.to(device=device, dtype=dtype, non_blocking=True))
    _sync(device)


def read_once_forward(model, probe, batch_size, points):
    """The bare pass with a hook at each recorded point that reads its output once
    (a whole-tensor ``amax`` in torch's own threads, no per-channel result): what any
    recording that looks at every activation pays at least, hooks included.  Printed
    as the "read-once floor" next to each ratio, so the part of the overhead that is
    bookkeeping can be told from the part that is reading the maps."""
    def make_hook(_point):
        def hook(_module, _inputs, output):
            output.detach().amax()
        return hook

    with point_hooks(model, points, make_hook):
        bare_forward(model, probe, batch_size)


def time_ratio(name, model, probe, batch_size, repeats, layers=None):
    device = model_device_dtype(model)[0]
    points = resolve_points(model, servable_layers(model, layers), example=probe.load_batch([0]).to(device))
    with tempfile.TemporaryDirectory() as tmp:
        writer = ConceptWriter(tmp, probe=probe, layers=layers, k=10, batch_size=batch_size, progress=False)
        observation = writer.add_concepts(model, step=0)  # warm-up; also writes the thumbnails once
        bare_forward(model, probe, batch_size)
        read_once_forward(model, probe, batch_size, points)
        bare, floor, ours = [], [], []
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            bare_forward(model, probe, batch_size)
            t1 = time.perf_counter()
            read_once_forward(model, probe, batch_size, points)
            _sync(device)
            t2 = time.perf_counter()
            writer.add_concepts(model, step=step)
            _sync(device)
            t3 = time.perf_counter()
            bare.append(t1 - t0)
            floor.append(t2 - t1)
            ours.append(t3 - t2)
        writer.close()
    neurons = observation.n_neurons
    ratio = float(np.median(ours) / np.median(bare))
    verdict = "PASS" if ratio <= 1.25 else "FAIL"
    print(f"{name:18s} {len(observation):3d} layers {neurons:6d} neurons {len(probe):5d} images  bare "
          f"{np.median(bare):7.2f} s  add_concepts {np.median(ours):7.2f} s  ratio {ratio:.3f} (target <= 1.25) "
          f"{verdict}  read-once floor {np.median(floor) / np.median(bare):.3f}", flush=True)
    return ratio


class Wide(torch.nn.Module):
    """4,608 conv channels on small maps: many neurons, cheap forward."""

    def __init__(self):
        super().__init__()
        chans = [3, 512, 1024, 1024, 2048]
        self.layers = torch.nn.Sequential(*[
            torch.nn.Sequential(torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.ReLU())
            for a, b in zip(chans[:-1], chans[1:])])

    def forward(self, x):
        return self.layers(x)


class RSSSampler:
    """Peak of the *current* resident set size (``/proc/self/statm``) sampled every
    millisecond in a thread: ``ru_maxrss`` is a lifetime high-water mark, which the set-up
    before the measured call may already have set."""

    def __init__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.current()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def current(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def run(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def memory_child(mode: str, images: int):
    """Run in a fresh process: peak RSS growth during the bare pass or add_concepts."""
    torch.manual_seed(0)
    model = Wide()
    probe = ConceptShapes(n=images, size=16, seed=0)
    probe.load_batch(range(len(probe)))  # build any cache before measuring
    # Code, not data: load the compiled recording loops (numba, ~90 MiB of LLVM and
    # machine code) in both modes before measuring, by recording a 2-image probe.
    from tb_conceptevo.recording import record
    record(model, ConceptShapes(n=2, size=16, seed=0), k=1, progress=False)
    sampler = RSSSampler()
    with sampler:
        run_memory_case(mode, model, probe)
    print((sampler.peak - sampler.base) / 2**20)  # MiB


def run_memory_case(mode, model, probe):
    if mode == "bare":
        bare_forward(model, probe, 64)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            writer = ConceptWriter(tmp, probe=probe, k=10, batch_size=64, progress=False, thumbnail_size=16)
            writer.add_concepts(model, step=0)
            writer.close()


def memory(images: int):
    run = lambda mode: float(subprocess.run([sys.executable, __file__, "--memory-child", mode, "--images", str(images)],
                                            capture_output=True, text=True, check=True).stdout.split()[-1])
    bare, ours = run("bare"), run("record")
    neurons = 512 + 1024 + 1024 + 2048
    dense = neurons * images * 4 / 2**20
    extra = ours - bare
    verdict = "PASS" if extra < 0.1 * dense + 64 else "FAIL"
    print(f"memory     {neurons} neurons x {images} images: peak RSS growth bare {bare:.0f} MiB, add_concepts {ours:.0f} MiB, "
          f"extra {extra:.0f} MiB (a dense neurons x images float32 matrix would be {dense:.0f} MiB) {verdict}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048, help="probe images for resnet18 / vgg16")
    parser.add_argument("--deep-images", type=int, default=1024, help="for mobilenet_v3_small, efficientnet_b0, resnet50")
    parser.add_argument("--vit-images", type=int, default=256, help="for vit_b_16 (224 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", default=",".join(MODELS) + ",memory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-images", type=int, default=10_000)
    parser.add_argument("--memory-child", choices=["bare", "record"])
    parser.add_argument("--in-this-process", action="store_true",
                        help="time the models here instead of one fresh process each")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.images)
        return
    names = args.models.split(",")
    if not args.in_this_process and len(names) > 1:
        # One process per model: measured, a model timed after VGG16's 2,048-image passes
        # in the same process once read 1.47 where alone it reads 1.14-1.23 (allocator
        # and cache state), so the order of the list would change the verdicts.
        for name in names:
            subprocess.run([sys.executable, __file__, "--models", name, "--in-this-process",
                            "--images", str(args.images), "--deep-images", str(args.deep_images),
                            "--vit-images", str(args.vit_images), "--repeats", str(args.repeats),
                            "--batch-size", str(args.batch_size), "--device", args.device,
                            "--memory-images", str(args.memory_images)], check=True)
        return
    probes = {}
    for name in names:
        if name == "memory":
            memory(args.memory_images)
            continue
        factory, size, count = MODELS[name]
        n = {"images": args.images, "deep": args.deep_images, "vit": args.vit_images}[count]
        if (n, size) not in probes:
            probes[(n, size)] = ConceptShapes(n=n, size=size, seed=0)
            probes[(n, size)].load_batch(range(n))  # build the cache before timing
        torch.manual_seed(0)
        model = factory().to(args.device)
        time_ratio(name, model, probes[(n, size)], args.batch_size, args.repeats)


#: name -> (factory, image size, which image count); default layers everywhere (every
#: conv, read after its BatchNorm/activation; vit_b_16: its patch conv and MLP hidden units)
MODELS = {
    "resnet18": (torchvision.models.resnet18, 64, "images"),
    "vgg16": (torchvision.models.vgg16, 64, "images"),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, 64, "deep"),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, 64, "deep"),
    "resnet50": (torchvision.models.resnet50, 64, "deep"),
    "vit_b_16": (torchvision.models.vit_b_16, 224, "vit"),
}


if __name__ == "__main__":
    main()
