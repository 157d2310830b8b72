"""Input-transformation defenses: denoise or re-encode an image before the model sees it.

Each defense works as its reference library does, on uint8 HWC images, one image at a time; the
float [0, 1] ↔ uint8 conversion is ``data.to_uint8_hwc`` / ``data.from_uint8_hwc``. Because the
models take pixel-space input, this is the seed's denormalise → process → renormalise.

Limits, for all four: they are fixed preprocessing steps
that help only against an attacker who does not know they are there. An adaptive attacker
(``attacks.ThroughDefense``: the exact gradient where a defense has one, BPDA, Athalye et al. 2018,
where it has not) routes gradients through or around them and largely undoes them.
They also cost clean accuracy, which the evaluation reports as ``clean/<defense>/acc``.
"""

import abc
import io
import math

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional

from cifar_lightning.data import from_uint8_hwc, to_uint8_hwc


class Defense(abc.ABC):
    """A per-image transformation of uint8 (H, W, 3) images, applied to batches.

    Subclasses set their parameters, validate them in ``_check_params`` (raising ``ValueError``
    that names the field) and implement ``process`` for one image. ``__call__`` takes float
    [0, 1] batches (N, 3, H, W) on any device and returns the same shape on that device.
    Images are processed one after another in the calling thread: a thread pool over both cores was
    measured slower at every batch size (JPEG q=30: 33 against 18 ms for 128 images; the median
    filter: 0.71 against 0.04 ms for 4, Square's batches), the images being too small to pay for it.
    """

    def __init__(self) -> None:
        self._check_params()

    @abc.abstractmethod
    def _check_params(self) -> None: ...

    @abc.abstractmethod
    def process(self, image: np.ndarray) -> np.ndarray:
        """One uint8 (H, W, 3) RGB image → the defended uint8 (H, W, 3) image."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short name with the parameter, as used in TensorBoard tags, e.g. ``jpeg_q30``."""

    def approximation(self, images: Tensor) -> Tensor:
        """A differentiable stand-in for the defense on float [0, 1] batches, whose gradient an
        adaptive attacker follows. The identity here (BPDA); a subclass with a differentiable form
        returns it."""
        return images

    def process_batch(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) → uint8 (N, H, W, 3)."""
        return np.stack([self.process(image) for image in images])

    def __call__(self, images: Tensor) -> Tensor:
        if not len(images):  # e.g. a test batch with no image of the subset the ε sweep runs on
            return images.clone()
        return from_uint8_hwc(self.process_batch(to_uint8_hwc(images))).to(images.device)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def _check_kernel(owner: str, kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"{owner}: kernel_size={kernel_size!r} must be an odd integer >= 3, e.g. 3 or 5")


class GaussianBlur(Defense):
    """Gaussian smoothing, ``cv2.GaussianBlur`` with σ derived from the kernel size.

    Removes high-frequency perturbations and, with them, fine image detail.
    """

    def __init__(self, kernel_size: int = 3) -> None:
        self.kernel_size = kernel_size
        super().__init__()

    def _check_params(self) -> None:
        _check_kernel("GaussianBlur", self.kernel_size)

    @property
    def name(self) -> str:
        return f"gaussian_k{self.kernel_size}"

    def process(self, image: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(image, (self.kernel_size, self.kernel_size), 0)

    def approximation(self, images: Tensor) -> Tensor:
        """The same blur as a convolution (OpenCV's kernel, its reflect-101 border): exact but for
        the rounding to 8 bits."""
        line = torch.from_numpy(cv2.getGaussianKernel(self.kernel_size, 0)).float().to(images.device)
        kernel = (line @ line.T).expand(images.shape[1], 1, -1, -1)
        padded = functional.pad(images, (self.kernel_size // 2,) * 4, mode="reflect")
        return functional.conv2d(padded, kernel, groups=images.shape[1])


class JpegCompression(Defense):
    """JPEG encode and decode with Pillow (Dziugaite et al. 2016; Das et al. 2017).

    Quantises away small DCT coefficients, where much of an L∞ perturbation lives; at 32×32 the
    8×8 blocks are a quarter of the image wide, so low qualities visibly damage it.
    """

    def __init__(self, quality: int = 30) -> None:
        self.quality = quality
        super().__init__()

    def _check_params(self) -> None:
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 95:
            raise ValueError(f"JpegCompression: quality={self.quality!r} must be an integer in 1..95, e.g. 30")

    @property
    def name(self) -> str:
        return f"jpeg_q{self.quality}"

    def process(self, image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=self.quality)
        return np.asarray(Image.open(buffer).convert("RGB"))


class MedianFilter(Defense):
    """Median filter, ``cv2.medianBlur`` (the "local smoothing" squeezer of Xu et al. 2018).

    Good against sparse, salt-and-pepper-like changes; FGSM changes every pixel, so less so.
    """

    def __init__(self, kernel_size: int = 3) -> None:
        self.kernel_size = kernel_size
        super().__init__()

    def _check_params(self) -> None:
        _check_kernel("MedianFilter", self.kernel_size)

    @property
    def name(self) -> str:
        return f"median_k{self.kernel_size}"

    def process(self, image: np.ndarray) -> np.ndarray:
        return cv2.medianBlur(image, self.kernel_size)


class TotalVariationDenoise(Defense):
    """Total-variation denoising (Guo et al. 2018 used TV minimisation as a defense): Chambolle's
    algorithm as ``skimage.restoration.denoise_tv_chambolle(image, weight, channel_axis=-1)`` runs
    it, each colour channel on its own, in float64, with its stopping rule (the energy changes by less
    than 2e-4 of its first value, or 200 iterations).

    It runs here on a whole batch at once in torch, each image with its own stopping rule: a batch
    of 128 images takes a quarter of the time of scikit-image one image at a time (the work per
    32×32 image is too small for numpy's per-call cost), and gives the same pixels
    (``tests/test_defenses.py`` compares them with scikit-image's). The result is rounded to the
    nearest grey level. Larger weights flatten more texture.
    """

    max_iterations, tolerance = 200, 2.0e-4  # scikit-image's max_num_iter and eps

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = weight
        super().__init__()

    def _check_params(self) -> None:
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"TotalVariationDenoise: weight={self.weight!r} must be a finite number > 0, e.g. 0.1")

    @property
    def name(self) -> str:
        return f"tv_w{self.weight:g}"

    def process(self, image: np.ndarray) -> np.ndarray:
        return self.process_batch(image[np.newaxis])[0]

    def process_batch(self, images: np.ndarray) -> np.ndarray:
        channels = torch.from_numpy(images).permute(0, 3, 1, 2).reshape(-1, *images.shape[1:3])
        # As scikit-image's img_as_float: uint8 times 1/255, in float64.
        denoised = self._chambolle(channels.double() * (1.0 / 255))
        pixels = (denoised * 255).clamp(0, 255).round().to(torch.uint8)
        return pixels.reshape(len(images), images.shape[3], *images.shape[1:3]).permute(0, 2, 3, 1).numpy()

    def _chambolle(self, images: Tensor) -> Tensor:
        """Chambolle's projection algorithm on (B, H, W) float64 images, each stopped on its own.

        scikit-image's arithmetic, in its order, into buffers made once (while no image stops): at
        these sizes making a new tensor per operation costs as much as the arithmetic."""
        weight, tau = self.weight, 0.25  # tau: 1 / (2 · the 2 image axes)
        result = images.clone()
        active = torch.arange(len(images))  # the images still iterating, and their rows in `result`
        dual = torch.zeros(len(images), 2, *images.shape[1:], dtype=images.dtype)
        gradient = torch.zeros_like(dual)  # its last row (axis 0) and column (axis 1) stay 0
        out, energy = images.clone(), torch.zeros(len(images), dtype=images.dtype)
        divergence, squares, norm = torch.empty_like(images), torch.empty_like(dual), torch.empty_like(dual[:, :1])
        for iteration in range(self.max_iterations):
            if iteration:
                # The negative divergence of the dual field.
                torch.sum(dual, 1, out=divergence).neg_()
                divergence[:, 1:, :] += dual[:, 0, :-1, :]
                divergence[:, :, 1:] += dual[:, 1, :, :-1]
                torch.add(images, divergence, out=out)
                energy = divergence.square().sum((1, 2))
            torch.sub(out[:, 1:, :], out[:, :-1, :], out=gradient[:, 0, :-1, :])
            torch.sub(out[:, :, 1:], out[:, :, :-1], out=gradient[:, 1, :, :-1])
            torch.sum(torch.mul(gradient, gradient, out=squares), 1, keepdim=True, out=norm).sqrt_()
            energy = (energy + weight * norm.sum((1, 2, 3))) / images[0].numel()
            # (dual - tau · gradient) / (1 + norm · tau / weight); tau · gradient is exact, so fused or not alike.
            dual.sub_(gradient, alpha=tau).div_(norm.mul_(tau / weight).add_(1.0))
            if not iteration:
                first = previous = energy
                continue
            done = (previous - energy).abs() < self.tolerance * first
            previous = energy
            if done.any():
                result[active[done]] = out[done]
                if done.all():
                    return result
                running = ~done
                active, images, out, dual = active[running], images[running], out[running], dual[running]
                gradient, first, previous = gradient[running], first[running], previous[running]
                divergence, squares, norm = divergence[running], squares[running], norm[running]
        result[active] = out
        return result


def default_defenses() -> list[Defense]:
    """The seed's four: Gaussian blur k=3, JPEG q=30, median filter k=3, TV denoise weight 0.1."""
    return [GaussianBlur(3), JpegCompression(30), MedianFilter(3), TotalVariationDenoise(0.1)]
