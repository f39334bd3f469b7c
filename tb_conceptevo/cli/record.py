"""``tb-conceptevo record``: snapshots for a folder of saved checkpoints.

The research workflow: train first (saving ``state_dict`` checkpoints), look later.
Give the probe the training script uses (a function returning it), so transforms,
channels and sizes match by construction::

    tb-conceptevo record --factory mymodels.py:make_cnn --checkpoints ckpts/ \\
        --logdir runs --run baseline --probe myprobes.py:make_probe

    # the embedded ConceptShapes probe set (the default) or an image folder:
    tb-conceptevo record --factory mymodels:make_cnn --checkpoints ckpts/ \\
        --logdir runs --run baseline --probe concept_shapes:n=1024,seed=0

The step of each checkpoint is the last integer in its file name
(``epoch_12.pt`` -> 12), or its position in name order when names carry no number.
Recording into a run that already has snapshots checks the probe hash against the
logged one first and skips the steps already logged.  Every checkpoint is loaded
into the model before anything is written; a record that fails before its first
snapshot leaves no event file behind.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import List, Tuple

from .common import CHANNELS_HELP, PROBE_HELP, help_text

CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "record", help="write concept snapshots for a folder of checkpoints",
        description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--factory", required=True, metavar="MODULE:FUNCTION",
                        help="'module:function' (or 'file.py:function') building the model (untrained)")
    parser.add_argument("--checkpoints", required=True, help="folder of state_dict checkpoints (*.pt, *.pth, *.ckpt, *.bin)")
    parser.add_argument("--logdir", required=True, help="TensorBoard logdir")
    parser.add_argument("--run", required=True, help="run name (sub-directory of the logdir)")
    parser.add_argument("--probe", default="concept_shapes:n=1024,seed=0", metavar="SPEC",
                        help=PROBE_HELP + " (default concept_shapes:n=1024,seed=0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side for an image-folder --probe (default 64)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help=CHANNELS_HELP)
    parser.add_argument("--layers", default=None, help="comma-separated layer names (default: every Conv2d)")
    parser.add_argument("--k", type=int, default=10, help="stimuli per neuron (default 10)")
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
    from .common import build_model, check_probe_matches, load_checkpoint, load_factory, load_probe, logged_run

    checkpoints = checkpoint_steps(args.checkpoints)
    factory = load_factory(args.factory)
    probe = load_probe(args.probe, args.image_size, channels=args.channels)
    header, logged_steps = logged_run(args.logdir, args.run)
    check_probe_matches(probe, header, args.run)
    spaces = [load_space(path) for path in args.space]
    layers = [name.strip() for name in args.layers.split(",")] if args.layers else None
    todo = [(step, path) for step, path in checkpoints if step not in set(logged_steps)]
    if len(todo) < len(checkpoints):
        skipped = sorted(set(s for s, _ in checkpoints) - set(s for s, _ in todo))
        print(f"run {args.run!r} already has snapshots at steps {skipped}: skipped")
    if not todo:
        print(f"nothing to do: every checkpoint's step is already logged in {os.path.join(args.logdir, args.run)}")
        return 0
    for _, path in todo:  # every checkpoint fits the model before anything is written
        load_checkpoint(build_model(factory, args.factory), path)

    run_dir = os.path.join(args.logdir, args.run)
    run_dir_existed = os.path.isdir(run_dir)
    before = set(os.listdir(run_dir)) if run_dir_existed else set()
    writer = ConceptWriter(run_dir, probe=probe, layers=layers, k=args.k,
                           batch_size=args.batch_size, spaces=spaces)
    written: List[int] = []
    try:
        for step, path in tqdm(todo, desc="checkpoints"):
            model = load_checkpoint(build_model(factory, args.factory), path)
            if args.device:
                model = model.to(torch.device(args.device))
            writer.add_concepts(model, step=step)
            written.append(step)
    except BaseException as error:
        writer.close()
        if not written:
            _remove_new_files(run_dir, before, run_dir_existed)
        elif isinstance(error, Exception):
            raise RuntimeError(f"{error} (snapshots of steps {written} were written; run the same command "
                               f"again to record the remaining checkpoints)") from error
        raise
    writer.close()
    print(f"wrote {len(written)} snapshots to {run_dir}")
    return 0


def _remove_new_files(run_dir: str, before: set, run_dir_existed: bool) -> None:
    """Delete the event files a failed record created (no phantom run)."""
    if "://" in run_dir or not os.path.isdir(run_dir):
        return
    for name in set(os.listdir(run_dir)) - before:
        if name.startswith("events.out.tfevents."):
            os.remove(os.path.join(run_dir, name))
    if not run_dir_existed and not os.listdir(run_dir):
        os.rmdir(run_dir)
