"""``tb-conceptevo importance``: importance of concept evolutions between two checkpoints.

::

    tb-conceptevo importance --factory mymodels:make_cnn --from ckpt/epoch3.pt --to ckpt/epoch9.pt \\
        --class 2 --class star --images concept_shapes:n=1024,seed=0 \\
        --logdir runs --run baseline --from-step 3 --to-step 9 --revert

writes, into the run's event files at step ``--to-step``, one
``conceptevo/importance/<class>/<layer>`` payload per class and layer (and with
``--revert`` one ``conceptevo/revert/<class>`` table per class), the same events as
``ConceptWriter.add_concept_importance``.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict

import torch

from .common import build_model, load_checkpoint, load_factory, load_probe  # noqa: F401 (re-exported)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "importance",
        help="importance of concept evolutions for classes between two checkpoints (+ revert evaluation)",
        description=__doc__.split("::")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--factory", required=True, metavar="MODULE:FUNCTION",
                        help="function returning the model (untrained); MODULE may be a dotted "
                             "module name importable from the current folder or a path to a .py file")
    parser.add_argument("--from", dest="checkpoint_from", required=True, metavar="CKPT",
                        help="checkpoint at epoch t (state_dict, or a dict with 'model'/'state_dict')")
    parser.add_argument("--to", dest="checkpoint_to", required=True, metavar="CKPT",
                        help="checkpoint at epoch t' (same architecture)")
    parser.add_argument("--class", dest="classes", action="append", required=True, metavar="C",
                        help="class index or class name of the probe set; repeat for several classes")
    parser.add_argument("--images", required=True, metavar="SPEC",
                        help="class images: 'concept_shapes[:n=1024,seed=0,size=64,label=shape]' or an "
                             "image folder with one subfolder per class")
    parser.add_argument("--image-size", type=int, default=64,
                        help="side in pixels of images loaded from a folder (default 64)")
    parser.add_argument("--logdir", required=True, help="TensorBoard log directory")
    parser.add_argument("--run", required=True, help="run name (subfolder of --logdir)")
    parser.add_argument("--from-step", type=int, required=True, help="training step of --from")
    parser.add_argument("--to-step", type=int, required=True,
                        help="training step of --to (the events are written at this step)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                        help="module names (default: every nn.Conv2d)")
    parser.add_argument("--n-images", type=int, default=128,
                        help="class images sampled per class (default 128, as in the paper; 0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--revert", action="store_true", help="also run the revert evaluation (Sec. 4.4)")
    parser.add_argument("--bins", type=int, default=4, help="importance bins of the revert evaluation")
    parser.add_argument("--revert-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="seeds of the random baseline bins (one random bin per seed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------- loading


def resolve_class(text: str, probe) -> int:
    names = list(getattr(probe, "class_names", None) or [])
    try:
        return int(text)
    except ValueError:
        pass
    if text in names:
        return names.index(text)
    raise ValueError(f"--class {text!r} is neither an index nor a class name of the probe set "
                     f"(class names: {names or 'none'})")


# --------------------------------------------------------------------------- command


def run(args) -> int:
    from torch.utils.tensorboard import SummaryWriter

    from tb_conceptevo import metadata
    from tb_conceptevo.importance import (
        concept_evolution_importance,
        importance_payloads,
        revert_evaluation,
        revert_payload,
    )
    from tb_conceptevo.summary import payload_summary

    if args.n_images < 0:
        raise ValueError("--n-images must be >= 0 (0 = every image of the class)")
    factory = load_factory(args.factory)
    device = torch.device(args.device)
    model_from = load_checkpoint(build_model(factory, args.factory), args.checkpoint_from).to(device)
    model_to = load_checkpoint(build_model(factory, args.factory), args.checkpoint_to).to(device)
    probe = load_probe(args.images, args.image_size)
    classes = [resolve_class(text, probe) for text in args.classes]
    max_images = args.n_images or None
    progress = not args.no_progress

    results: Dict[int, tuple] = {}
    for class_index in classes:
        result = concept_evolution_importance(
            model_from, model_to, probe, class_index, args.layers, args.batch_size, progress,
            max_images=max_images, seed=args.seed, from_step=args.from_step, to_step=args.to_step,
        )
        revert = None
        if args.revert:
            revert = revert_evaluation(
                model_from, model_to, probe, class_index, result, n_bins=args.bins,
                seeds=args.revert_seeds, batch_size=args.batch_size, progress=progress,
                max_images=max_images, seed=args.seed,
            )
        results[class_index] = (result, revert)

    # Write only after everything was computed: a failure leaves the run untouched.
    writer = SummaryWriter(log_dir=os.path.join(args.logdir, args.run))
    try:
        file_writer = writer._get_file_writer()
        for class_index, (result, revert) in results.items():
            for tag, (header, arrays) in importance_payloads(result).items():
                file_writer.add_summary(payload_summary(tag, header, arrays), args.to_step)
            if revert is not None:
                header, arrays = revert_payload(revert)
                file_writer.add_summary(payload_summary(metadata.revert_tag(class_index), header, arrays),
                                        args.to_step)
    finally:
        writer.close()

    for class_index, (result, revert) in results.items():
        label = f"class {class_index}" + (f" ({result.class_name})" if result.class_name else "")
        print(f"{label}: {result.n_images} images, {len(result.layers)} layers, "
              f"steps {args.from_step} -> {args.to_step}")
        for layer, channel, value in result.top(5):
            print(f"  {layer}:{channel}  importance {value:.2f}")
        if revert is not None:
            print("  " + revert.table().replace("\n", "\n  "))
    print(f"wrote {sum(len(r.layers) + (v is not None) for r, v in results.values())} payloads to "
          f"{os.path.join(args.logdir, args.run)} at step {args.to_step}")
    return 0
