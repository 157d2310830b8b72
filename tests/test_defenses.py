import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.restoration import denoise_tv_chambolle

from cifar_lightning.defenses import (
    GaussianBlur,
    JpegCompression,
    MedianFilter,
    TotalVariationDenoise,
    default_defenses,
)
from tests.helpers import SHARED_CIFAR10


def _jpeg(image, quality):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


REFERENCES = {
    "gaussian_k3": lambda image: cv2.GaussianBlur(image, (3, 3), 0),
    "jpeg_q30": lambda image: _jpeg(image, 30),
    "median_k3": lambda image: cv2.medianBlur(image, 3),
    "tv_w0.1": lambda image: np.clip(denoise_tv_chambolle(image, weight=0.1, channel_axis=-1) * 255, 0, 255)
    .round().astype(np.uint8),
}


def _random_images(n=12):
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _real_images(n=16):
    if not (SHARED_CIFAR10 / "test.npz").is_file():
        pytest.skip("needs ../shared/cifar10")
    with np.load(SHARED_CIFAR10 / "test.npz") as data:
        return data["images"][:n]


def test_defaults_are_the_seed_parameters():
    assert [d.name for d in default_defenses()] == list(REFERENCES)


@pytest.mark.parametrize("images", [_random_images, _real_images], ids=["random", "real"])
@pytest.mark.parametrize("defense", default_defenses(), ids=lambda d: d.name)
def test_each_defense_equals_its_reference_library_bit_for_bit(defense, images):
    batch = images()
    expected = np.stack([REFERENCES[defense.name](image) for image in batch])
    assert np.array_equal(defense.process_batch(batch), expected)
    as_tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255  # the float path
    out = defense(as_tensor)
    assert out.shape == as_tensor.shape and out.dtype == torch.float32
    assert np.array_equal(out.mul(255).round().byte().permute(0, 2, 3, 1).numpy(), expected)


def test_batched_tv_denoising_gives_scikit_images_pixels_on_clean_and_attacked_images():
    """Each image stops on its own rule inside the batch: a batch of many, some stopping early."""
    clean = _real_images(256)
    signs = np.random.default_rng(0).choice([-8, 8], clean.shape)  # an FGSM-like ±8 grey levels
    batch = np.concatenate([clean, np.clip(clean.astype(int) + signs, 0, 255).astype(np.uint8)])
    expected = np.stack([REFERENCES["tv_w0.1"](image) for image in batch])
    assert np.array_equal(TotalVariationDenoise(0.1).process_batch(batch), expected)


def test_defenses_change_images():
    batch = _random_images()
    for defense in default_defenses():
        assert not np.array_equal(defense.process_batch(batch), batch), defense.name


def test_a_defense_of_no_images_is_no_images():
    empty = torch.rand(0, 3, 32, 32)  # a test batch with none of the subset the ε sweep runs on
    for defense in default_defenses():
        assert defense(empty).shape == (0, 3, 32, 32), defense.name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GaussianBlur(4), "GaussianBlur: kernel_size=4 must be an odd integer >= 3"),
        (lambda: MedianFilter(1), "MedianFilter: kernel_size=1 must be an odd integer >= 3"),
        (lambda: MedianFilter(3.0), "MedianFilter: kernel_size=3.0 must be an odd integer"),
        (lambda: JpegCompression(0), "JpegCompression: quality=0 must be an integer in 1..95"),
        (lambda: JpegCompression(96), "JpegCompression: quality=96 must be an integer in 1..95"),
        (lambda: TotalVariationDenoise(0), "TotalVariationDenoise: weight=0 must be a finite number > 0"),
        (lambda: TotalVariationDenoise(-1.0), "TotalVariationDenoise: weight=-1.0 must be"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()
