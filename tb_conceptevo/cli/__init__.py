"""``tb-conceptevo`` command line.

Each subcommand lives in its own module of this package exposing
``register(subparsers)``; the module is imported lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: subcommand modules, in help order
SUBCOMMAND_MODULES = ("record", "space", "importance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tb-conceptevo",
        description="Record, fit, back-fill and inspect concept-evolution data for TensorBoard.",
        epilog="example (train first, look later; 'tb-conceptevo COMMAND --help' for each command):\n"
               "  tb-conceptevo record --factory train.py:make_model --checkpoints ckpts/ --logdir runs \\\n"
               "      --run baseline --probe train.py:make_probe\n"
               "  tb-conceptevo fit-space --logdir runs --run baseline --out space.npz\n"
               "  tb-conceptevo project --logdir runs --space space.npz\n"
               "  tensorboard --logdir runs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        # User errors: one clear line, no stack trace.
        message = str(exc)
        if "expected input" in message and "channels" in message:  # torch's conv message for a wrong probe
            message += (" -- the probe's images do not have the channels the model takes: give the probe the "
                        "training script uses (--probe module:function), or --channels 1 for an image folder")
        print(f"tb-conceptevo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
