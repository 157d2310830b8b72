"""The CIFAR-10-C corruptions (cifar_lightning.corruptions): shapes and ranges, severity, determinism, the
published parameters, errors and the loader of the published files. On real test images where the shared copy is
there (random ones otherwise); about 15 s on one thread."""

import numpy as np
import pytest
import torch

from cifar_lightning import corruptions
from cifar_lightning.corruptions import CORRUPTIONS, PARAMETERS, SEVERITIES, corrupt, load_cifar10_c
from cifar_lightning.data import CIFAR10DataError, from_uint8_hwc
from tests.helpers import SHARED_CIFAR10

# The damage (mean absolute difference to the clean image) falls or stalls from one severity to the next where
# the published parameters trade one effect for another, so these are left out of the monotonicity test:
NOT_MONOTONE = {
    # σ 0.05, 0.25, 0.4 with one pass of pixel shuffling, then σ 0.25, 0.4 with two: more blur smooths the shuffle
    # back, so severities 1-3 are about equal and 5 below 4.
    "glass_blur",
    # The affine jitter falls (2.56 → 0.96 px) as the elastic field grows finer: severity 1 moves pixels most.
    "elastic_transform",
    # The image's weight falls (1 → 0.75) as the frost's rises (0.2 → 0.45): the darkening cancels part of the
    # added brightness (the published photos show the same fall from severity 3 on).
    "frost",
    # Severities 3 and 4 have σ 2 with radius 6 and 8: taps beyond 6 weigh e^-49/8 < 0.3 %, so the same blur
    # but for the random angle; checked without severity 4 below.
    "motion_blur",
}


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    """Eight test images, float [0, 1] (8, 3, 32, 32)."""
    if (SHARED_CIFAR10 / "test.npz").is_file():
        with np.load(SHARED_CIFAR10 / "test.npz") as archive:
            images = archive["images"][:8]
    else:
        images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    return from_uint8_hwc(images)


@pytest.fixture(scope="module")
def damage(clean) -> dict[str, list[float]]:
    """Mean absolute difference to the clean images, per corruption and severity 1..5 (all 75 variants)."""
    return {name: [(corrupt(clean, name, severity) - clean).abs().mean().item() for severity in SEVERITIES]
            for name in CORRUPTIONS}


def test_the_15_corruptions_in_their_4_groups():
    assert list(corruptions.GROUPS) == ["noise", "blur", "weather", "digital"]
    assert len(CORRUPTIONS) == 15 and set(PARAMETERS) == set(CORRUPTIONS)
    assert all(len(params) == 5 for params in PARAMETERS.values())
    assert not {"speckle_noise", "gaussian_blur", "spatter", "saturate"} & set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_variant_keeps_shape_dtype_range_and_changes_the_image(clean, name):
    for severity in SEVERITIES:
        out = corrupt(clean.double(), name, severity)
        assert out.shape == clean.shape and out.dtype == torch.float64
        assert 0 <= out.min() and out.max() <= 1
        assert ((out * 255) - (out * 255).round()).abs().max() < 1e-4, "values are whole uint8 levels"
        assert not torch.equal(out, clean.double()), f"{name} at severity {severity} left the images as they were"


def test_damage_grows_with_severity(damage):
    for name in set(CORRUPTIONS) - NOT_MONOTONE:
        assert damage[name] == sorted(damage[name]), f"{name}: {damage[name]}"
    motion = damage["motion_blur"]
    assert [motion[0], motion[1], motion[2], motion[4]] == sorted([motion[0], motion[1], motion[2], motion[4]])


def test_severity_5_does_more_than_severity_1_for_all_but_elastic(damage):
    # elastic_transform: the published severity 1 has the largest affine jitter (see NOT_MONOTONE)
    for name in set(CORRUPTIONS) - {"elastic_transform"}:
        assert damage[name][4] > damage[name][0], f"{name}: {damage[name]}"


def test_the_same_image_gets_the_same_pixels_in_any_batch(clean):
    indices = torch.tensor([3, 5, 7])
    for name in ("gaussian_noise", "glass_blur", "motion_blur", "snow", "frost", "fog", "elastic_transform"):
        whole = corrupt(clean, name, 3, seed=1)
        part = corrupt(clean[indices], name, 3, seed=1, indices=indices)
        assert torch.equal(part, whole[indices]), name
        reversed_order = corrupt(clean.flip(0), name, 3, seed=1, indices=torch.arange(8).flip(0))
        assert torch.equal(reversed_order, whole.flip(0)), name


def test_seeds_indices_and_severities_draw_different_noise(clean):
    first = clean[:1]
    base = corrupt(first, "gaussian_noise", 3, seed=0)
    assert not torch.equal(base, corrupt(first, "gaussian_noise", 3, seed=1))
    assert not torch.equal(base, corrupt(first, "gaussian_noise", 3, seed=0, indices=torch.tensor([1])))
    assert torch.equal(base, corrupt(first, "gaussian_noise", 3, seed=0))


def test_the_published_parameters():
    assert PARAMETERS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert PARAMETERS["contrast"] == (0.75, 0.5, 0.4, 0.3, 0.15)
    assert PARAMETERS["shot_noise"] == (500, 250, 100, 75, 50)
    assert PARAMETERS["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert PARAMETERS["motion_blur"][4] == (9, 2.5) and PARAMETERS["frost"][4] == (0.75, 0.45)


def test_gaussian_noise_and_contrast_do_what_their_parameters_say():
    grey = torch.full((1, 3, 32, 32), 0.5)
    for severity, sigma in zip(SEVERITIES, PARAMETERS["gaussian_noise"]):
        noise = corrupt(grey, "gaussian_noise", severity) - grey
        assert noise.std().item() == pytest.approx(sigma, rel=0.08)  # 3,072 draws, cut to uint8
    halves = torch.zeros(1, 3, 32, 32)
    halves[..., 16:] = 1  # channel mean 0.5, deviation ±0.5
    for severity, scale in zip(SEVERITIES, PARAMETERS["contrast"]):
        out = corrupt(halves, "contrast", severity)
        assert out[..., 16:].mean().item() - 0.5 == pytest.approx(0.5 * scale, abs=1 / 255)


def test_the_motion_blur_kernel_is_imagemagicks_half_gaussian_line():
    kernel = corruptions._motion_blur_kernel(6, 1, 0)  # 13 taps along +x, from the pixel itself
    centre = kernel.shape[0] // 2
    weights = np.exp(-np.arange(13) ** 2 / 2)
    np.testing.assert_allclose(kernel[centre, centre:], weights / weights.sum())
    assert kernel.sum() == pytest.approx(1) and kernel[:, :centre].sum() == 0 and kernel[centre + 1:].sum() == 0
    assert np.flatnonzero(corruptions._motion_blur_kernel(6, 1, 90)[:, centre]).tolist() == list(range(12, 25))


@pytest.mark.parametrize(("name", "severity", "field"), [
    ("fogg", 1, "corruption 'fogg' is not one of gaussian_noise"), ("speckle_noise", 1, "corruption"),
    ("fog", 6, "severity 6 is outside 1–5"), ("fog", 0, "severity 0"), ("fog", 2.0, "severity 2.0"),
])
def test_bad_names_and_severities_raise_naming_the_field(clean, name, severity, field):
    with pytest.raises(ValueError, match=field):
        corrupt(clean, name, severity)
    with pytest.raises(ValueError, match=field):
        corruptions.check_corruption(name, severity)


def test_bad_images_and_indices_raise(clean):
    with pytest.raises(ValueError, match=r"pass float \[0, 1\] \(N, 3, 32, 32\)"):
        corrupt(clean[:, :, :16], "fog", 1)
    with pytest.raises(ValueError, match="indices"):
        corrupt(clean, "fog", 1, indices=torch.arange(3))


def _published_files(folder, per_severity: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A small fog.npy and labels.npy in the published layout: severities 1..5 stacked, `per_severity` each."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5 * per_severity, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 5 * per_severity).astype(np.uint8)
    np.save(folder / "fog.npy", images)
    np.save(folder / "labels.npy", labels)
    return images, labels


def test_the_loader_returns_that_severitys_slice_and_labels(tmp_path):
    images, labels = _published_files(tmp_path)
    loaded, loaded_labels = load_cifar10_c(tmp_path, "fog", 3)
    assert loaded.shape == (4, 3, 32, 32) and loaded.dtype == torch.float32
    assert torch.equal(loaded, from_uint8_hwc(images[8:12]))
    assert loaded_labels.dtype == torch.int64 and loaded_labels.tolist() == labels[8:12].tolist()


def test_the_loader_names_the_missing_or_malformed_file(tmp_path):
    with pytest.raises(CIFAR10DataError, match=r"fog\.npy does not exist\. Fix: pass the folder"):
        load_cifar10_c(tmp_path, "fog", 1)
    _published_files(tmp_path)
    np.save(tmp_path / "labels.npy", np.zeros(7, np.uint8))
    with pytest.raises(CIFAR10DataError, match=r"labels\.npy is uint8 \(7,\), expected 20 integer labels"):
        load_cifar10_c(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((20, 32, 32), np.uint8))
    with pytest.raises(CIFAR10DataError, match=r"fog\.npy is uint8 \(20, 32, 32\)"):
        load_cifar10_c(tmp_path, "fog", 1)
    with pytest.raises(ValueError, match="severity 7"):
        load_cifar10_c(tmp_path, "fog", 7)
