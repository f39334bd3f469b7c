import hashlib

import numpy as np
import pytest
import torch

from tb_conceptevo.probes.base import ProbeSet


class TensorProbe(ProbeSet):
    """In-memory probe set for tests (random images of a given size)."""

    def __init__(self, images: torch.Tensor, labels=None):
        self.images = images.float()
        self._labels = labels

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], (-1 if self._labels is None else int(self._labels[i]))

    def load_batch(self, indices):
        return self.images[torch.as_tensor(list(indices), dtype=torch.long)]

    def raw_images(self, indices):
        x = self.images[torch.as_tensor(list(indices), dtype=torch.long)]
        x = (x - x.min()) / (x.max() - x.min() + 1e-9)
        return (x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)

    @property
    def hash(self):
        return hashlib.sha256(self.images.numpy().tobytes()).hexdigest()


def random_probe(n=40, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorProbe(torch.rand(n, 3, size, size, generator=g))


@pytest.fixture
def small_probe():
    return random_probe()
