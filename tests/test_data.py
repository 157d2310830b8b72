import numpy as np
import pytest
import torch

from cifar_lightning.data import (
    CIFAR10DataError,
    CIFAR10DataModule,
    from_uint8_hwc,
    load_cifar10,
    random_crop_flip,
    split_indices,
    to_uint8_hwc,
)
from tests.helpers import SHARED_CIFAR10


def test_split_is_45k_5k_disjoint_and_seeded():
    train, val = split_indices(50_000, 0.1, seed=0)
    assert (len(train), len(val)) == (45_000, 5_000)
    assert torch.cat([train, val]).sort().values.equal(torch.arange(50_000))
    again_train, again_val = split_indices(50_000, 0.1, seed=0)
    assert train.equal(again_train) and val.equal(again_val)
    assert not val.equal(split_indices(50_000, 0.1, seed=1)[1])


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="needs ../shared/cifar10")
def test_real_copy_loads_as_uint8_nchw():
    images, labels = load_cifar10(SHARED_CIFAR10, train=False)
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # SOURCE.md's check


def test_datamodule_splits_the_slice(cifar_slice):
    dm = CIFAR10DataModule(data_dir=str(cifar_slice), batch_size=32)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (576, 64)
    dm.setup("test")
    assert len(dm.test_set) == 256


def test_augmentation_keeps_shape_dtype_range_and_changes_images():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    changed = (out != images).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # 1 in 81 crops is centred, half of those unflipped


def test_augmentation_is_a_crop_of_the_padded_image_or_its_mirror():
    torch.manual_seed(1)
    image = torch.randint(1, 256, (1, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(image.repeat(200, 1, 1, 1))
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))[0]
    crops = [padded[:, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
    windows = {view.numpy().tobytes() for crop in crops for view in (crop, crop.flip(-1))}
    assert all(o.numpy().tobytes() in windows for o in out)
    assert len({o.numpy().tobytes() for o in out}) > 50  # offsets and flips really vary


class _Stage:
    def __init__(self, training: bool):
        self.training, self.world_size = training, 1


def test_batch_hook_augments_train_only_and_scales_to_unit_range(cifar_slice):
    dm = CIFAR10DataModule(data_dir=str(cifar_slice))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16)
    for training in (False, True):
        dm.trainer = _Stage(training)
        out, out_labels = dm.on_after_batch_transfer((images, labels), 0)
        assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
        assert out_labels.equal(labels)
        assert out.mul(255).round().to(torch.uint8).equal(images) != training


def test_uint8_conversion_round_trips():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    as_float = images.float() / 255
    hwc = to_uint8_hwc(as_float)
    assert hwc.shape == (5, 32, 32, 3) and hwc.dtype == np.uint8
    assert from_uint8_hwc(hwc).equal(as_float)


def _write(folder, **arrays):
    folder.mkdir(exist_ok=True)
    np.savez(folder / "train.npz", **arrays)
    return folder


GOOD_IMAGES = np.zeros((4, 32, 32, 3), np.uint8)
GOOD_LABELS = np.arange(4, dtype=np.uint8)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": GOOD_IMAGES[..., 0], "labels": GOOD_LABELS}, r"expected uint8 \(N, 32, 32, 3\)"),
        ({"images": GOOD_IMAGES.astype(np.float32), "labels": GOOD_LABELS}, "float32"),
        ({"images": GOOD_IMAGES, "labels": np.array([0, 1, 2, 12])}, r"labels must be integers 0-9, found \[12\]"),
        ({"images": GOOD_IMAGES, "labels": GOOD_LABELS[:3]}, r"expected \(4,\)"),
        ({"images": GOOD_IMAGES}, r"missing array \['labels'\]"),
    ],
)
def test_malformed_npz_gives_one_clear_error(tmp_path, arrays, message):
    folder = _write(tmp_path / "data", **arrays)
    with pytest.raises(CIFAR10DataError, match=message) as error:
        load_cifar10(folder, train=True)
    assert str(folder / "train.npz") in str(error.value) and "--data.data_dir" in str(error.value)


def test_truncated_npz_gives_one_clear_error(tmp_path):
    folder = _write(tmp_path / "data", images=GOOD_IMAGES, labels=GOOD_LABELS)
    data = (folder / "train.npz").read_bytes()
    (folder / "train.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CIFAR10DataError, match="truncated or not an npz archive"):
        load_cifar10(folder, train=True)


def test_missing_folder_without_download_names_the_folder(tmp_path):
    with pytest.raises(CIFAR10DataError, match=f"data folder {tmp_path / 'nope'} does not exist"):
        load_cifar10(tmp_path / "nope", train=True)


def test_a_failed_download_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar

    def no_internet(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_internet)
    with pytest.raises(CIFAR10DataError, match=f"could not download CIFAR-10 into {tmp_path / 'new'}") as error:
        load_cifar10(tmp_path / "new", train=True, download=True)
    assert "../shared/cifar10" in str(error.value)


def test_empty_folder_without_download_points_to_the_fix(tmp_path):
    with pytest.raises(CIFAR10DataError, match="--data.download true"):
        load_cifar10(tmp_path, train=False)


@pytest.mark.parametrize(("field", "value"), [("val_fraction", 0.0), ("val_fraction", 1.0), ("batch_size", 0)])
def test_bad_datamodule_arguments_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        CIFAR10DataModule(**{field: value})
