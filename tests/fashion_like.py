"""A Fashion-MNIST-shaped dataset made in the tests: 1-channel 28 px PIL images
(mode ``L``) with integer labels and torchvision's ``classes``, plus a small
1-channel CNN with ten outputs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


class FashionLike(torch.utils.data.Dataset):
    """``n`` images; image ``i`` has class ``i % 10``: a bright horizontal bar at a
    class-specific row over integer noise (exact uint8 data, no float rounding)."""

    classes = FASHION_CLASSES

    def __init__(self, n: int = 200, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]
        for i, label in enumerate(self.targets):
            self.data[i, 2 + 2 * label: 5 + 2 * label, 4:24] = 250
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return Image.fromarray(self.data[index], "L"), self.targets[index]


def fashion_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10),
    )
