"""The demo's small CNN (also usable as a factory: ``--factory demo.model:make_cnn``)."""

import torch
from torch import nn


class DemoCNN(nn.Module):
    """Four 3x3 conv layers (16-32-64-64 channels), global average pooling, a linear head.

    Layer names users see in TensorBoard: ``features.0``, ``features.4``, ``features.8``,
    ``features.12`` (the convs; ConceptEvo records conv outputs before the ReLU).
    """

    def __init__(self, n_classes: int = 6, widths=(16, 32, 64, 64), dropout: float = 0.3, batch_norm: bool = True):
        super().__init__()
        layers = []
        channels = 3
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1),
                       nn.BatchNorm2d(width) if batch_norm else nn.Identity(), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2) if i < len(widths) - 1 else nn.Identity())
            channels = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(x))


def make_cnn() -> DemoCNN:
    return DemoCNN()
