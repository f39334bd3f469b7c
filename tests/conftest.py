import contextlib
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


class ExactBranchy(torch.nn.Module):
    """A non-sequential model (two branches and a skip) whose activations are exact
    integers in float32 on integer-valued images: integer weights, zero biases, ReLU.
    Every partial sum is an integer below 2**24, so results are bit-identical whatever
    the batch composition, summation order, thread count or CPU code path; tests of
    exact properties (batch and shard independence) use it instead of random floats."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.left = torch.nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.right = torch.nn.Conv2d(8, 6, 1, bias=False)
        self.head = torch.nn.Linear(6, 4)
        with torch.no_grad():
            for conv in (self.stem, self.left, self.right):
                conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape, generator=g).float())

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.left(x) + torch.relu(self.right(x))
        return self.head(y.mean(dim=(2, 3)))


def integer_probe(n=40, size=12, seed=0):
    """Images with integer pixel values 0..15 (see :class:`ExactBranchy`)."""
    g = torch.Generator().manual_seed(seed)
    return TensorProbe(torch.randint(0, 16, (n, 3, size, size), generator=g).float())


@contextlib.contextmanager
def float64_defaults():
    """Create modules in float64 (their random init drawn in float64 too: a float32
    init differs by one ulp between CPU code paths, and training amplifies it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_in_a_temporary_folder(tmp_path_factory):
    """CLIP-Dissect caches features on disk by default (``~/.cache/tb_conceptevo``): the
    tests use a folder of their own, so they neither read a user's cache nor leave one."""
    import os

    previous = os.environ.get("TB_CONCEPTEVO_CACHE")
    os.environ["TB_CONCEPTEVO_CACHE"] = str(tmp_path_factory.mktemp("feature_cache"))
    yield
    if previous is None:
        os.environ.pop("TB_CONCEPTEVO_CACHE", None)
    else:
        os.environ["TB_CONCEPTEVO_CACHE"] = previous
