"""CIFAR-10 as uint8 tensors in memory, augmented a whole batch at a time.

The loaders yield uint8 images; ``on_after_batch_transfer`` augments (train only) and scales to
float [0, 1] on the device. Normalisation is the model's first layer (``models.Normalized``), so
every image a user, an attack or a defense handles is in pixel space.
"""

import math
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_NPZ_FILES = {True: "train.npz", False: "test.npz"}
_FIX = (
    "Fix: point --data.data_dir at a folder with train.npz/test.npz (arrays `images` uint8 "
    "N×32×32×3 and `labels` 0-9, e.g. ../shared/cifar10), or at an empty folder with "
    "--data.download true to fetch torchvision's copy."
)


class CIFAR10DataError(ValueError):
    """The data folder is missing, unreadable, malformed or too small for the configured split and batch;
    the message says how to fix it."""


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """Float [0, 1] (N, 3, H, W) → uint8 (N, H, W, 3), rounding to the nearest grey level."""
    return images.detach().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_hwc(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) → float [0, 1] (N, 3, H, W); exact inverse of :func:`to_uint8_hwc`."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)


def _check_arrays(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise CIFAR10DataError(
            f"{source}: `images` is {images.dtype} {images.shape}, expected uint8 (N, 32, 32, 3). {_FIX}"
        )
    if len(images) == 0:
        raise CIFAR10DataError(f"{source} holds no images (`images` is {images.shape}). {_FIX}")
    if labels.shape != (len(images),):
        raise CIFAR10DataError(
            f"{source}: `labels` has shape {labels.shape}, expected ({len(images)},). {_FIX}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise CIFAR10DataError(f"{source}: labels must be integers 0-9, found {labels.dtype} values "
                               f"{labels[:5].tolist()}. {_FIX}")
    if labels.min() < 0 or labels.max() > 9:
        bad = labels[(labels < 0) | (labels > 9)][:5]
        raise CIFAR10DataError(f"{source}: labels must be integers 0-9, found {bad.tolist()}. {_FIX}")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in ("images", "labels") if name in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if isinstance(err, ValueError) and zipfile.is_zipfile(path):  # an intact archive; numpy refused to unpickle
            raise CIFAR10DataError(f"{path} stores an array as Python objects, which are not loaded (unpickling "
                                   f"could run code); `images` and `labels` must be numeric arrays. {_FIX}") from None
        raise CIFAR10DataError(f"{path} is truncated or not an npz archive ({err}). {_FIX}") from None
    missing = {"images", "labels"} - arrays.keys()
    if missing:
        raise CIFAR10DataError(f"{path}: missing array {sorted(missing)}; it needs `images` and `labels`. {_FIX}")
    return arrays["images"], arrays["labels"]


def _load_torchvision(data_dir: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import CIFAR10

    if data_dir.exists() and not data_dir.is_dir():
        raise CIFAR10DataError(f"data folder {data_dir} is a file, not a folder. {_FIX}")
    try:
        dataset = CIFAR10(root=str(data_dir), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise CIFAR10DataError(f"no CIFAR-10 in {data_dir} ({err}). {_FIX}") from None
    except OSError as err:  # URLError and socket errors when there is no internet
        raise CIFAR10DataError(f"could not download CIFAR-10 into {data_dir} ({err}). {_FIX}") from None
    return dataset.data, np.asarray(dataset.targets)


def load_cifar10(data_dir: str | Path, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """One split as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    Reads ``train.npz``/``test.npz`` when the folder has them (the format of ``../shared/cifar10``),
    else torchvision's CIFAR-10 files in that folder, downloading them if ``download``.
    """
    data_dir = Path(data_dir)
    npz = data_dir / _NPZ_FILES[train]
    if npz.is_file():
        images, labels = _load_npz(npz)
        source = str(npz)
    else:
        if not data_dir.exists() and not download:
            raise CIFAR10DataError(f"data folder {data_dir} does not exist. {_FIX}")
        if (data_dir / _NPZ_FILES[not train]).is_file() and not download:
            raise CIFAR10DataError(f"data folder {data_dir} has {_NPZ_FILES[not train]} but no {npz.name}. {_FIX}")
        images, labels = _load_torchvision(data_dir, train, download)
        source = f"torchvision CIFAR-10 in {data_dir}"
    _check_arrays(images, labels, source)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels.astype(np.int64))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random partition of ``range(n)`` into (train, val) index tensors."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1), e.g. 0.1 for a 45k/5k split")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * val_fraction)
    return permutation[n_val:], permutation[:n_val]


def random_crop_flip(images: Tensor, padding: int = 4) -> Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip, each image its own draw.

    Works on a whole batch (N, C, H, W) of any dtype at once, on its device; same shape out.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    shifts = torch.randint(0, 2 * padding + 1, (2, n, 1), device=images.device)
    rows = (shifts[0] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (shifts[1] + torch.arange(w, device=images.device))[:, None, None, :]
    flip = torch.rand(n, device=images.device) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 with a seeded train/val split, held in memory as uint8 tensors.

    Args:
        data_dir: folder with ``train.npz``/``test.npz``, or torchvision's CIFAR-10 files.
        download: fetch torchvision's copy into ``data_dir`` when it has no data.
        batch_size: images per batch, for every stage.
        val_fraction: share of the 50k training images held out for validation.
        split_seed: seed of the train/val split (independent of the training seed).
        augment: random crop (padding 4) + horizontal flip on training batches.
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"CIFAR10DataModule: batch_size={batch_size} must be at least 1, e.g. 128")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"CIFAR10DataModule: val_fraction={val_fraction} must be in (0, 1), e.g. 0.1 for a "
                             f"45k/5k split")
        self.save_hyperparameters(logger=False)  # the dashboard logs its own choice (dashboard.py)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        """Download once (rank 0) when asked to and the folder has no npz files."""
        data_dir = Path(self.hparams.data_dir)
        for train in (True, False):
            if self.hparams.download and not (data_dir / _NPZ_FILES[train]).is_file():
                _load_torchvision(data_dir, train, download=True)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            images, labels = load_cifar10(self.hparams.data_dir, train=True)
            train_idx, val_idx = split_indices(len(labels), self.hparams.val_fraction, self.hparams.split_seed)
            self._check_split(len(train_idx), len(val_idx))
            self.train_set = TensorDataset(images[train_idx], labels[train_idx])
            self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        if stage == "fit":
            # Training batches drop the last partial one: a batch larger than a process's share of the
            # split would leave nothing to train on.
            world_size = self.trainer.world_size if self.trainer is not None else 1
            images_per_process = math.ceil(len(self.train_set) / world_size)
            if images_per_process < self.hparams.batch_size:
                raise CIFAR10DataError(f"CIFAR10DataModule: batch_size={self.hparams.batch_size} is more than the "
                                       f"{images_per_process} training images each process gets from "
                                       f"{self.hparams.data_dir}: fit would train on no batch. Fix: a "
                                       f"--data.batch_size of at most {images_per_process}.")
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = TensorDataset(*load_cifar10(self.hparams.data_dir, train=False))

    def _check_split(self, n_train: int, n_val: int) -> None:
        """Refuse a split of the training images that leaves no validation or no training image."""
        data_dir, fraction, n = self.hparams.data_dir, self.hparams.val_fraction, n_train + n_val
        if n < 2:
            raise CIFAR10DataError(f"CIFAR10DataModule: {data_dir} holds {n} training image, and the train/validation "
                                   f"split needs at least 2 (one to train on, one to validate on). Fix: point "
                                   f"--data.data_dir at a folder with more training images, e.g. ../shared/cifar10.")
        # A fraction that holds out one image or more and leaves one or more: 0.1, or for n <= 10 images
        # 1/n rounded up to a percent.
        suggestion = max(0.1, math.ceil(100 / n) / 100)
        if n_val == 0:
            raise CIFAR10DataError(f"CIFAR10DataModule: val_fraction={fraction} of the {n} training images in "
                                   f"{data_dir} holds out no validation image. Fix: a larger --data.val_fraction, "
                                   f"e.g. {suggestion}.")
        if n_train == 0:
            raise CIFAR10DataError(f"CIFAR10DataModule: val_fraction={fraction} of the {n} training images in "
                                   f"{data_dir} holds out all of them, leaving none to train on. Fix: a smaller "
                                   f"--data.val_fraction, e.g. {suggestion}.")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def _eval_loader(self, dataset: TensorDataset) -> DataLoader:
        # Lightning's default DistributedSampler pads ranks with repeated images; evaluation must
        # count each image exactly once, so shard without repeats.
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images)
        return images.float().div_(255), labels
