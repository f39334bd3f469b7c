"""``tb-conceptevo record``: snapshots for a folder of saved checkpoints.

The research workflow: train first (saving ``state_dict`` checkpoints), look later::

    tb-conceptevo record --factory mymodels:make_cnn --checkpoints ckpts/ \\
        --logdir runs --run baseline --probe concept_shapes:n=1024,seed=0

The step of each checkpoint is the last integer in its file name
(``epoch_12.pt`` -> 12), or its position in name order when names carry no number.
"""

from __future__ import annotations

import os
import re
from typing import List, Tuple

CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "record", help="write concept snapshots for a folder of checkpoints",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--factory", required=True, help="'module:function' (or 'file.py:function') building the model")
    parser.add_argument("--checkpoints", required=True, help="folder of state_dict checkpoints (*.pt, *.pth, *.ckpt, *.bin)")
    parser.add_argument("--logdir", required=True, help="TensorBoard logdir")
    parser.add_argument("--run", required=True, help="run name (sub-directory of the logdir)")
    parser.add_argument("--probe", default="concept_shapes:n=1024,seed=0",
                        help="probe set: 'concept_shapes:n=1024,seed=0,size=64' or an image folder")
    parser.add_argument("--image-size", type=int, default=64, help="image size for an image-folder probe")
    parser.add_argument("--layers", default=None, help="comma-separated layer names (default: every Conv2d)")
    parser.add_argument("--k", type=int, default=10, help="stimuli per neuron")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--space", action="append", default=[], help="saved space file to place neurons in (repeatable)")
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    parser.set_defaults(func=run)


def checkpoint_steps(folder: str) -> List[Tuple[int, str]]:
    """``[(step, path)]`` sorted by step; clear errors for empty folders or clashes."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--checkpoints {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(CHECKPOINT_EXTENSIONS))
    if not names:
        raise ValueError(f"no checkpoints ({', '.join(CHECKPOINT_EXTENSIONS)}) in {folder!r}")
    numbers = [re.findall(r"\d+", os.path.splitext(n)[0]) for n in names]
    if all(numbers):
        steps = [int(found[-1]) for found in numbers]
        if len(set(steps)) != len(steps):
            raise ValueError(f"checkpoint names in {folder!r} give the same step twice: {names}")
    else:
        steps = list(range(len(names)))
    return sorted(zip(steps, (os.path.join(folder, n) for n in names)))


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..spaces import load_space
    from ..writer import ConceptWriter
    from .common import build_model, load_checkpoint, load_factory, load_probe

    checkpoints = checkpoint_steps(args.checkpoints)
    factory = load_factory(args.factory)
    probe = load_probe(args.probe, args.image_size)
    spaces = [load_space(path) for path in args.space]
    layers = [name.strip() for name in args.layers.split(",")] if args.layers else None
    writer = ConceptWriter(os.path.join(args.logdir, args.run), probe=probe, layers=layers, k=args.k,
                           batch_size=args.batch_size, spaces=spaces)
    try:
        for step, path in tqdm(checkpoints, desc="checkpoints"):
            model = load_checkpoint(build_model(factory, args.factory), path)
            if args.device:
                model = model.to(torch.device(args.device))
            writer.add_concepts(model, step=step)
    finally:
        writer.close()
    print(f"wrote {len(checkpoints)} snapshots to {os.path.join(args.logdir, args.run)}")
    return 0
