"""Your own data, defined once for the training script and the command line.

The training script imports ``make_probe`` (and ``make_model``); the CLI is given the
same functions, so transforms, channels and sizes match by construction::

    tb-conceptevo record --factory examples/own_data.py:make_model --checkpoints ckpts/ \\
        --logdir runs --run photos --probe examples/own_data.py:make_probe

tests/test_docs.py runs these functions (on a folder of images it writes, and a small
open_clip architecture with random weights saved to a file).
"""

import torch

from tb_conceptevo import probes
from tb_conceptevo.detectors import CLIPDissect

#: the model's classes, in the order of its output logits
CLASSES = ["cat", "dog", "fox"]


def make_model() -> torch.nn.Module:
    """The (untrained) model; ``record`` loads each checkpoint's state_dict into it."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, len(CLASSES)),
    )


def make_probe(root: str = "photos") -> probes.ProbeSet:
    """photos/<class>/<any name>.jpg|png|...: any size or mode (16-bit, palette, alpha, CMYK)."""
    return probes.ImageFolderProbe(root, size=64, class_names=CLASSES)


def clip_detector(weights: str = "clip_weights/open_clip_pytorch_model.bin", arch: str = "ViT-B-32",
                  concepts="english") -> CLIPDissect:
    """CLIP-Dissect labels from open_clip weights: a local file, or an open_clip
    pretrained tag (e.g. "laion2b_s34b_b79k"; downloaded once, when online)."""
    return CLIPDissect(arch, pretrained=weights, concepts=concepts, cache_dir="clip_cache")
