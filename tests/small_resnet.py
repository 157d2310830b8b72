"""A small CIFAR ResNet, standing in for a user's own classifier in the loading tests.

Importable by name (``tests.small_resnet.SmallResNet``) so a ``cifar-lightning`` subprocess can build
it from ``--model.network.class_path``; that needs the repository root on PYTHONPATH.
"""

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a strided 1x1 conv-BN where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class SmallResNet(nn.Module):
    """A stem and three stages of one residual block (``width``, 2×, 4× channels; the last two halve the
    size), global average pooling and a linear head. Input: (N, 3, 32, 32); output: logits (N, num_classes).

    The module names follow torchvision's ResNet (``conv1``, ``layer1.0.conv1``, ``fc``), as a user's would.
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)).relu())))
        return self.fc(out.mean((2, 3)))
