"""The classifier of the study and the wrapper that lets it take pixel-space input."""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from cifar_lightning.data import CIFAR10_MEAN, CIFAR10_STD


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3x3-BN-ReLU-Conv3x3-BN-ReLU-MaxPool2: halves the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ImprovedCNN(nn.Module):
    """The seed study's CIFAR-10 network: 3 conv blocks (64/128/256) and a 2-layer head.

    Input: normalised images (N, 3, 32, 32). Output: logits (N, num_classes).
    3,249,994 parameters; its ``state_dict`` saved with ``torch.save`` is 13.02 MB.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ImprovedCNN: dropout={dropout} must be in [0, 1), e.g. 0.5")
        self.features = nn.Sequential(_conv_block(3, 64), _conv_block(64, 128), _conv_block(128, 256))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(256 * 4 * 4, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class Normalized(nn.Module):
    """``model(normalise(x))``: a classifier that takes images in [0, 1].

    Attacks and defenses work in pixel space, so every model they see is wrapped in this: an
    ε of 8/255 then means 8 grey levels, and no code adds an ε to a normalised tensor.
    Mean and std are non-persistent buffers, so the wrapped model's ``state_dict`` is unchanged.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


# What ImprovedCNN takes: CIFAR-10 images standardised per channel.
CIFAR10_NORMALIZATION = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}


def check_normalization(normalization: Mapping[str, Sequence[float]] | None, owner: str) -> None:
    """Raise ValueError, naming the field, unless ``normalization`` is null or a finite mean and a std > 0
    for each of the 3 channels."""
    fix = (f"Fix: --model.normalization '{{mean: [r, g, b], std: [r, g, b]}}' as the network was trained, e.g. "
           f"CIFAR-10's {{mean: {list(CIFAR10_MEAN)}, std: {list(CIFAR10_STD)}}}, or null for a network that takes "
           f"[0, 1] pixels")
    if normalization is None:
        return
    if set(normalization) != {"mean", "std"}:
        raise ValueError(f"{owner}: normalization has the keys {sorted(normalization)}, not mean and std. "
                         f"{fix}")
    for key, values in normalization.items():
        if len(values) != 3:
            raise ValueError(f"{owner}: normalization.{key}={list(values)} must hold 3 numbers, one per RGB "
                             f"channel. {fix}")
        if not all(math.isfinite(value) and (key == "mean" or value > 0) for value in values):
            rule = "finite" if key == "mean" else "finite and > 0"
            raise ValueError(f"{owner}: normalization.{key}={list(values)} must be {rule}. {fix}")


def pixel_input(network: nn.Module, normalization: Mapping[str, Sequence[float]] | None) -> Normalized:
    """``network`` as a model of [0, 1] images: normalised with ``normalization``'s ``mean`` and ``std``
    first, or fed the pixels as they are (None: mean 0, std 1, so its weights keep the same names)."""
    mean, std = ((0.0,) * 3, (1.0,) * 3) if normalization is None else (normalization["mean"], normalization["std"])
    return Normalized(network, mean, std)
