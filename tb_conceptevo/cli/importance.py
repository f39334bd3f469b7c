"""``tb-conceptevo importance``: importance of concept evolutions between two checkpoints.

Example::

    tb-conceptevo importance --factory mymodels:make_cnn --from ckpt/epoch3.pt --to ckpt/epoch9.pt \\
        --class 2 --class star --probe concept_shapes:n=1024,seed=0 \\
        --logdir runs --run baseline --from-step 3 --to-step 9 --revert

    # the probe the training script logged, built by its own function:
    tb-conceptevo importance --factory train.py:make_model --from ckpt/e1.pt --to ckpt/e9.pt \\
        --class Bag --probe train.py:make_probe --logdir runs --run fashion --from-step 1 --to-step 9

writes, into the run's event files at step ``--to-step``, one
``conceptevo/importance/<class>/<layer>`` payload per class and layer (and with
``--revert`` one ``conceptevo/revert/<class>`` table per class), the same events as
``ConceptWriter.add_concept_importance``.

``--class`` is the model's class index (its output logit), or a class name when the
probe's class names are in the model's order (a Dataset's ``classes``, or
``ImageFolderProbe(..., class_names=[...])``; for a plain image folder, say the order
with ``--class-names``).  When the run has a logged probe set, the given probe must
be the same (same hash) unless ``--other-probe`` says the class images are another set.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict

import torch

from .common import (  # noqa: F401 (re-exported)
    CHANNELS_HELP,
    PROBE_HELP,
    build_model,
    check_probe_matches,
    help_text,
    load_checkpoint,
    load_factory,
    load_probe,
    logged_run,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "importance",
        help="importance of concept evolutions for classes between two checkpoints (+ revert evaluation)",
        description=help_text(__doc__),
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
    parser.add_argument("--probe", "--images", dest="probe", required=True, metavar="SPEC",
                        help="class images with labels: " + PROBE_HELP + "; a folder has one subfolder per class")
    parser.add_argument("--image-size", type=int, default=64,
                        help="side in pixels of images loaded from a folder (default 64)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help=CHANNELS_HELP)
    parser.add_argument("--class-names", default=None, metavar="A,B,...",
                        help="for an image-folder --probe: the model's class names in output order "
                             "(folder NAME holds class index class-names.index(NAME))")
    parser.add_argument("--other-probe", action="store_true",
                        help="the class images are not the probe set the run logged (skip the hash check)")
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


def resolve_class(text: str, probe, header=None) -> int:
    """The model's class index for ``--class text``: an int, or a name the probe's class
    names map to exactly one index in the model's order (checked against the names the
    run logged, ``header``); otherwise a ValueError listing the mapping."""
    names = list(getattr(probe, "class_names", None) or [])
    order = getattr(probe, "class_order", "model") if names else None
    logged = list(header.get("class_names") or []) if header else []
    logged_order = (header or {}).get("class_order") or (
        "folders" if (header or {}).get("probe_type") == "ImageFolderProbe" else "model")
    mapping = ", ".join(f"{i}={name!r}" for i, name in enumerate(names)) or "none"
    if logged and names and logged != names and logged_order == order == "model":
        raise ValueError(
            f"the probe's class names ({mapping}) differ from those run logged "
            f"({', '.join(f'{i}={n!r}' for i, n in enumerate(logged))}); pass the probe the run was recorded with"
        )
    try:
        return int(text)
    except ValueError:
        pass
    if text not in names:
        raise ValueError(f"--class {text!r} is neither an index nor a class name of the probe set "
                         f"(class names: {mapping}); pass the model's class index")
    if names.count(text) > 1:
        raise ValueError(f"--class {text!r} names several classes ({mapping}); pass the model's class index")
    if order != "model":
        raise ValueError(
            f"--class {text!r}: this probe's class names are its sorted folder names ({mapping}), which are "
            f"the model's class indices only if it was trained on these folders with torchvision's "
            f"ImageFolder; pass the model's class index, or the model's order with --class-names "
            f"(e.g. --class-names {','.join(sorted(names)) if len(names) <= 12 else 'a,b,c'} when it is this), "
            f"or ImageFolderProbe(..., class_names=[...]) from --probe module:function"
        )
    return names.index(text)


# --------------------------------------------------------------------------- command


def run(args) -> int:
    from torch.utils.tensorboard import SummaryWriter

    from tb_conceptevo.format import metadata
    from tb_conceptevo.importance import concept_evolution_importance, revert_evaluation
    from tb_conceptevo.format.payloads import importance_payloads, revert_payload
    from tb_conceptevo.format.summary import payload_summary

    if args.n_images < 0:
        raise ValueError("--n-images must be >= 0 (0 = every image of the class)")
    factory = load_factory(args.factory)
    device = torch.device(args.device)
    model_from = load_checkpoint(build_model(factory, args.factory), args.checkpoint_from).to(device)
    model_to = load_checkpoint(build_model(factory, args.factory), args.checkpoint_to).to(device)
    class_names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    probe = load_probe(args.probe, args.image_size, class_names=class_names, channels=args.channels)
    header, _ = logged_run(args.logdir, args.run)
    if not args.other_probe:
        check_probe_matches(probe, header, args.run)
    classes = [resolve_class(text, probe, header if not args.other_probe else None) for text in args.classes]
    if getattr(probe, "class_order", None) == "folders":
        names = probe.class_names
        print("note: class indices of this image folder are its sorted folder names (" + ", ".join(
            f"{i}={names[i]!r}" for i in classes if 0 <= i < len(names)) + "); if the model orders its "
            "classes otherwise, give --class-names in the model's order")
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
