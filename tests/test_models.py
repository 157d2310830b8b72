import io

import pytest
import torch

from cifar_lightning.data import CIFAR10_MEAN, CIFAR10_STD
from cifar_lightning.models import ImprovedCNN, Normalized


def test_improved_cnn_has_the_seed_parameter_count_and_size():
    model = ImprovedCNN()
    assert sum(p.numel() for p in model.parameters()) == 3_249_994
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert buffer.tell() / 1e6 == pytest.approx(13.02, abs=0.005)


def test_improved_cnn_layout():
    model = ImprovedCNN()
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256]
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(4096, 512), (512, 10)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_normalized_takes_pixel_space_and_keeps_the_state_dict():
    inner = ImprovedCNN().eval()
    wrapped = Normalized(inner, CIFAR10_MEAN, CIFAR10_STD).eval()
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapped(x), inner((x - mean) / std))
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in inner.state_dict()}


def test_bad_dropout_is_rejected():
    with pytest.raises(ValueError, match="dropout=1.5"):
        ImprovedCNN(dropout=1.5)
