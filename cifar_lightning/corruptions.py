"""The 15 common corruptions of CIFAR-10-C at severities 1-5 (Hendrycks & Dietterich, "Benchmarking Neural
Network Robustness to Common Corruptions and Perturbations", ICLR 2019).

``corrupt`` applies one corruption at one severity to a batch of float [0, 1] (N, 3, 32, 32) images, with the
parameters of the published generator (``ImageNet-C/create_c/make_cifar_c.py`` in hendrycks/robustness; the
CIFAR values, not ImageNet-C's) and its quantisation to uint8 (values are cut to whole grey levels, as its
``np.uint8`` does). ``load_cifar10_c`` reads the published ``.npy`` files for those who have them.

Where this differs from the published generator:

- frost: the published one adds crops of six frost photos; this module ships no photos and adds a seeded
  procedural texture (a fractal haze with ice needles, tinted blue-white) with the published mixing
  coefficients. Frost images therefore differ from the published ones in texture.
- motion blur, and the blur of snow's flakes: the published one calls ImageMagick's motion blur (through Wand);
  here it is the same one-sided half-Gaussian line kernel (``_motion_blur_kernel``), applied with
  ``cv2.filter2D``. ``scripts/compare_imagemagick.py`` measures the difference (``docs/corruptions.md``).
- randomness: the published one draws from numpy's global state, image after image; here each image has its own
  generator, ``numpy.random.default_rng([seed, corruption number, severity, index])``, so an image's pixels depend
  only on those four numbers and not on the batch it came in. The draws follow the published distributions, so
  the images are alike in law, not equal pixel for pixel.

Limits: 32×32 RGB only (the published parameters, e.g. the fog's fractal and glass blur's loop, are for 32×32).
The work is per image (numpy, OpenCV, scipy), one image after another: a thread pool as in
``defenses.Defense`` was measured slower (34 s vs 40 s for all 75 variants of 1,000 images on 2 busy cores), the
images being too small for OpenCV's and numpy's released GIL to pay for the threads.
"""

import functools
import io
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage import color
from torch import Tensor

from cifar_lightning.data import CIFAR10DataError, from_uint8_hwc, to_uint8_hwc

GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for names in GROUPS.values() for name in names)
SEVERITIES = (1, 2, 3, 4, 5)
SIZE = 32  # CIFAR images are SIZE × SIZE; the published parameters are for this size

# The published generator's parameters, one entry per severity 1..5 (make_cifar_c.py, the CIFAR values).
PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # σ of the added noise
    "shot_noise": (500, 250, 100, 75, 50),  # photons at full scale: x → Poisson(x · c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values set to 0 or 1
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, its anti-alias σ
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # σ, max shift, iterations
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # ImageMagick radius, σ; angle ~ U(-45°, 45°)
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # zoom factors np.arange(1, c, 0.01), averaged with the image
    # flake mean, std, zoom, threshold, blur radius, blur σ, image weight; blur angle ~ U(-135°, -45°)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # fog strength, fractal decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # scale of the deviation from each channel's mean
    # displacement scale α, its smoothing σ, affine corner jitter (published: 32 × (α, σ, jitter) fractions)
    "elastic_transform": ((SIZE * 0, SIZE * 0, SIZE * 0.08), (SIZE * 0.05, SIZE * 0.2, SIZE * 0.07),
                          (SIZE * 0.08, SIZE * 0.06, SIZE * 0.06), (SIZE * 0.1, SIZE * 0.04, SIZE * 0.05),
                          (SIZE * 0.1, SIZE * 0.03, SIZE * 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side of the downsampled image, as a fraction of 32
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}


def check_corruption(name: str, severity: int) -> None:
    """Raise ``ValueError`` (one line: the field and the fix) unless ``name`` is one of ``CORRUPTIONS`` and
    ``severity`` one of ``SEVERITIES``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption {name!r} is not one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} is outside 1–5: pass an integer 1, 2, 3, 4 or 5")


# Shared helpers. Images are float64 (32, 32, 3) in [0, 1] unless said otherwise.

def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each channel, as skimage.filters.gaussian does it (scipy, border 'nearest', 4 σ)."""
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


@functools.lru_cache(maxsize=None)
def _zoom_matrix(factor: float) -> np.ndarray:
    """The (32, 32) matrix Z with ``Z @ column`` = a 32-vector zoomed into its centre by ``factor`` ≥ 1 as scipy's
    bilinear ``ndimage.zoom`` does it: the centre ceil(32 / factor) values, scaled up, their centre 32. Found by
    zooming the unit vectors (the zoom is linear)."""
    crop = int(np.ceil(SIZE / factor))
    top = (SIZE - crop) // 2
    zoomed = ndimage.zoom(np.eye(crop), (factor, 1), order=1)
    trim = (zoomed.shape[0] - SIZE) // 2
    matrix = np.zeros((SIZE, SIZE))
    matrix[:, top:top + crop] = zoomed[trim:trim + SIZE]
    return matrix


def _clipped_zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """(32, 32, C) → (32, 32, C): the published ``clipped_zoom`` (scipy's bilinear zoom of the centre crop, trimmed
    to 32 × 32), as the separable product Z · image · Zᵀ, a few times faster than ``ndimage.zoom``."""
    matrix = _zoom_matrix(factor)
    return (matrix @ image.transpose(2, 0, 1) @ matrix.T).transpose(1, 2, 0)


def _plasma_fractal(rng: np.random.Generator, decay: float, size: int = SIZE) -> np.ndarray:
    """A (size, size) diamond-square height map in [0, 1], wrapping at the edges; the random amplitude is divided
    by ``decay`` at each halving of the step, so a smaller decay gives finer grain. ``size`` a power of 2."""
    height = np.zeros((size, size))
    amplitude = 100.0
    step = size
    while step >= 2:
        half = step // 2

        def mean_plus_noise(four_neighbours_sum: np.ndarray) -> np.ndarray:
            # The published generator draws U(-a, a) · a: noise of amplitude a², kept for its look.
            return four_neighbours_sum / 4 + amplitude * rng.uniform(-amplitude, amplitude, four_neighbours_sum.shape)

        corners = height[::step, ::step]
        # Square step: each square's centre from its four corners.
        pair = corners + np.roll(corners, -1, axis=0)
        height[half::step, half::step] = mean_plus_noise(pair + np.roll(pair, -1, axis=1))
        # Diamond step: each edge midpoint from the two corners and two centres beside it.
        centres = height[half::step, half::step]
        for axis, rows, cols in ((0, slice(0, None, step), slice(half, None, step)),
                                 (1, slice(half, None, step), slice(0, None, step))):
            neighbours = centres + np.roll(centres, 1, axis=axis) + corners + np.roll(corners, -1, axis=1 - axis)
            height[rows, cols] = mean_plus_noise(neighbours)
        step = half
        amplitude /= decay
    height -= height.min()
    return height / height.max()


def _motion_blur_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """The kernel of ImageMagick's motion blur (``MotionBlurImage``) for ``cv2.filter2D``: 2·ceil(radius)+1 taps
    along ``angle`` (degrees, clockwise from +x in image coordinates), starting at the pixel itself and going
    forward only, weighted by a half Gaussian of ``sigma``; each tap is rounded to the nearest pixel."""
    taps = int(2 * np.ceil(radius) + 1)
    steps = np.arange(taps)
    weights = np.exp(-steps ** 2 / (2 * sigma ** 2))
    # The direction and the rounding (half up, ceil(v - 0.5)) as ImageMagick computes them, so that a tap exactly
    # half-way between two pixels (e.g. at 30°) lands on the same one.
    along = taps * np.array([np.cos(np.radians(angle)), np.sin(np.radians(angle))])
    dx, dy = (np.ceil(steps * component / np.hypot(*along) - 0.5).astype(int) for component in along)
    kernel = np.zeros((2 * taps - 1, 2 * taps - 1))
    np.add.at(kernel, (taps - 1 + dy, taps - 1 + dx), weights)
    return kernel / weights.sum()


def _motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) → the same, blurred along ``angle``; borders repeat the edge pixel, as
    ImageMagick's default virtual pixels do, and values are cut down to whole levels, as its 8-bit output is
    (measured: rounding instead differs from it by 0.5 levels on average)."""
    blurred = cv2.filter2D(image.astype(np.float64), -1, _motion_blur_kernel(radius, sigma, angle),
                           borderType=cv2.BORDER_REPLICATE)
    return np.clip(np.floor(blurred + 1e-6), 0, 255).astype(np.uint8)  # 1e-6: a flat area must stay its level


def _as_pil_roundtrip(image: np.ndarray, convert) -> np.ndarray:
    """Apply ``convert`` (a PIL image → a PIL image) to a float [0, 1] image, via uint8 as the published code."""
    return np.asarray(convert(Image.fromarray(_to_uint8(image))).convert("RGB"))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (clipped here) → uint8, cut down to whole levels as the published ``np.uint8``
    does; a uint8 image as it is."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _frost_texture(rng: np.random.Generator) -> np.ndarray:
    """A (32, 32, 3) frost-like texture in [0, 1]: grainy ice (a fine fractal haze, pixel grain and crystal
    needles: random antialiased segments, some branching, drawn at twice the size and shrunk) at a random level,
    tinted from grey-white to teal. It stands in for the published generator's crops of frost photos (frost1-5, cut
    to a fifth), whose statistics it roughly matches: mean ≈ (0.57, 0.65, 0.70) RGB, ≈ 0.09 std within a crop."""
    canvas = np.zeros((2 * SIZE, 2 * SIZE), np.float32)
    for _ in range(rng.integers(8, 16)):
        start = rng.uniform(0, 2 * SIZE, 2)
        angle = rng.uniform(0, 2 * np.pi)
        for branch in range(3):  # a needle and up to two side needles off its far end
            length = rng.uniform(6, 20) / (1 + branch)
            end = start + length * np.array([np.cos(angle), np.sin(angle)])
            cv2.line(canvas, tuple(int(v) for v in start), tuple(int(v) for v in end), float(rng.uniform(0.5, 1)),
                     1, cv2.LINE_AA)
            start, angle = end, angle + rng.uniform(0.4, 1.0) * (-1) ** rng.integers(2)  # turn left or right
    needles = cv2.resize(cv2.GaussianBlur(canvas, (3, 3), 0.7), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    ice = (rng.uniform(0.5, 0.9) + 0.25 * (_plasma_fractal(rng, decay=1.5) - 0.5) + 0.3 * needles
           + rng.normal(0, 0.07, (SIZE, SIZE)))
    tint = 1 - rng.uniform(0, 1) * np.array([0.45, 0.12, 0.0])  # 0: grey-white, 1: teal (frost1's hue)
    return np.clip(ice[..., None] * tint, 0, 1)


# One function per corruption: (float image, generator, that severity's parameters) → float image in [0, 1]
# (clipped and cut to uint8 by the caller) or a uint8 image.

def gaussian_noise(x, rng, sigma):
    return x + rng.normal(scale=sigma, size=x.shape)


def shot_noise(x, rng, photons):
    return rng.poisson(x * photons) / photons


def impulse_noise(x, rng, amount):
    # skimage's random_noise(mode='s&p'): each value, per channel, is flipped with probability `amount`, to 0 or 1
    # with equal odds.
    draw = rng.random(x.shape)
    return np.where(draw < amount / 2, 0.0, np.where(draw < amount, 1.0, x))


def defocus_blur(x, rng, params):
    radius, alias_sigma = params
    # A disk of `radius` on a 17 × 17 grid, smoothed by a 3 × 3 Gaussian to anti-alias it (radii ≤ 8 as here).
    grid = np.arange(-8, 9)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).astype(np.float32)
    kernel = cv2.GaussianBlur(disk / disk.sum(), (3, 3), alias_sigma)
    return cv2.filter2D(x, -1, kernel)


def glass_blur(x, rng, params):
    sigma, max_shift, iterations = params
    image = _to_uint8(_gaussian(x, sigma))
    rows = np.arange(max_shift + 1, SIZE)[:, None]  # the published loop visits 2..31 × 2..31 (max shift 1)
    cols = np.arange(max_shift + 1, SIZE)[None, :]
    for _ in range(iterations):
        # The published loop means to swap each pixel with a neighbour, but its numpy "swap" of two views copies
        # the neighbour into the pixel and leaves the neighbour as it was; and since every neighbour it reads
        # (offsets in [-max_shift, 0) ∪ {0}, np.random.randint's open end) comes later in its loop, each pass is
        # exactly this gather from the pass's input. The published CIFAR-10-C files hold this copy.
        dy, dx = rng.integers(-max_shift, max_shift, size=(2, *np.broadcast_shapes(rows.shape, cols.shape)))
        shifted = image.copy()
        shifted[rows, cols] = image[rows + dy, cols + dx]
        image = shifted
    return _gaussian(image / 255, sigma)


def motion_blur(x, rng, params):
    radius, sigma = params
    return _motion_blur(_to_uint8(x), radius, sigma, rng.uniform(-45, 45))


def zoom_blur(x, rng, last_factor):
    factors = np.arange(1, last_factor, 0.01)  # as published; float steps make 7, 12, 16, 21, 26 factors
    x = x.astype(np.float32)
    return (x + sum(_clipped_zoom(x, factor) for factor in factors)) / (len(factors) + 1)


def snow(x, rng, params):
    mean, std, zoom, threshold, blur_radius, blur_sigma, image_weight = params
    x = x.astype(np.float32)
    flakes = _clipped_zoom(rng.normal(mean, std, (SIZE, SIZE, 1)), zoom)[..., 0]
    flakes[flakes < threshold] = 0
    flakes = _motion_blur(_to_uint8(flakes), blur_radius, blur_sigma, rng.uniform(-135, -45)) / 255
    flakes = flakes[..., None]
    # Whiten the scene a little (a lighter grey where it is darker), then add the flakes and their 180° turn.
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = image_weight * x + (1 - image_weight) * np.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, k=2)


def frost(x, rng, params):
    image_weight, frost_weight = params
    return image_weight * _to_uint8(x) / 255 + frost_weight * _frost_texture(rng)


def fog(x, rng, params):
    strength, decay = params
    peak = x.max()
    x = x + strength * _plasma_fractal(rng, decay)[..., None]
    return x * peak / (peak + strength)


def brightness(x, rng, shift):
    hsv = color.rgb2hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
    return color.hsv2rgb(hsv)


def contrast(x, rng, scale):
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * scale + means


def elastic_transform(x, rng, params):
    alpha, sigma, jitter = params
    x = x.astype(np.float32)
    # A random affine map: three points around the centre moved by up to `jitter` pixels each.
    centre, reach = SIZE // 2, SIZE // 3
    source = np.float32([[centre + reach, centre + reach], [centre + reach, centre - reach],
                         [centre - reach, centre - reach]])
    target = source + rng.uniform(-jitter, jitter, size=source.shape).astype(np.float32)
    x = cv2.warpAffine(x, cv2.getAffineTransform(source, target), (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT_101)
    # Then a smooth random displacement field, bilinear resampling.
    dx, dy = (ndimage.gaussian_filter(rng.uniform(-1, 1, (SIZE, SIZE)), sigma, mode="reflect", truncate=3) * alpha
              for _ in range(2))
    rows, cols = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    coordinates = (rows + dy.astype(np.float32), cols + dx.astype(np.float32))
    return np.stack([ndimage.map_coordinates(x[..., channel], coordinates, order=1, mode="reflect")
                     for channel in range(3)], axis=-1)


def pixelate(x, rng, fraction):
    side = int(SIZE * fraction)
    return _as_pil_roundtrip(x, lambda pil: pil.resize((side, side), Image.BOX).resize((SIZE, SIZE), Image.BOX))


def jpeg_compression(x, rng, quality):
    def encode_decode(pil: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=quality)
        return Image.open(buffer)

    return _as_pil_roundtrip(x, encode_decode)


_FUNCTIONS = {name: globals()[name] for name in CORRUPTIONS}


def corrupt_uint8(images: np.ndarray, name: str, severity: int, seed: int = 0,
                  indices: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, 32, 32, 3) → uint8 (N, 32, 32, 3), corruption ``name`` at ``severity``: what :func:`corrupt`
    does, on numpy arrays. Image ``k`` draws from ``default_rng([seed, corruption number, severity,
    indices[k]])``; ``indices`` defaults to 0..N-1."""
    check_corruption(name, severity)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"images are {images.dtype} {images.shape}: pass uint8 (N, 32, 32, 3) CIFAR images")
    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    if indices.shape != (len(images),) or not np.issubdtype(indices.dtype, np.integer) or (indices < 0).any():
        raise ValueError(f"indices have shape {indices.shape} and dtype {indices.dtype}: pass N non-negative "
                         f"integers (N = {len(images)}), each image's index in its data set")
    function, params = _FUNCTIONS[name], PARAMETERS[name][severity - 1]
    number = CORRUPTIONS.index(name)

    corrupted = np.empty_like(images)
    for k, (image, index) in enumerate(zip(images, indices)):
        rng = np.random.default_rng([seed, number, severity, int(index)])
        corrupted[k] = _to_uint8(function(image / 255, rng, params))
    return corrupted


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0, indices: Tensor | None = None) -> Tensor:
    """Corruption ``name`` at ``severity`` (1-5) of float [0, 1] images (N, 3, 32, 32), on any device.

    Returns the same shape, dtype and device, values in [0, 1] on whole uint8 levels (the inputs are rounded to
    uint8 first). Deterministic: image k's random draws depend only on (``seed``, ``name``, ``severity``,
    ``indices[k]``), its index in the test set (default 0..N-1), so the same images give the same pixels in any
    batch. Raises ``ValueError`` for an unknown name or severity, or images not (N, 3, 32, 32) floats.
    """
    check_corruption(name, severity)
    if not images.is_floating_point() or images.ndim != 4 or tuple(images.shape[1:]) != (3, SIZE, SIZE):
        raise ValueError(f"images are {images.dtype} {tuple(images.shape)}: pass float [0, 1] (N, 3, 32, 32)")
    index_array = None if indices is None else indices.detach().cpu().numpy()
    corrupted = corrupt_uint8(to_uint8_hwc(images), name, severity, seed, index_array)
    return from_uint8_hwc(corrupted).to(device=images.device, dtype=images.dtype)


_FIX = ("Fix: pass the folder of the published CIFAR-10-C files (<name>.npy and labels.npy, from the paper's "
        "release), e.g. ../shared/CIFAR-10-C")


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CIFAR10DataError(f"{path} does not exist. {_FIX}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CIFAR10DataError(f"{path} is not a readable .npy array ({err}). {_FIX}") from None


def load_cifar10_c(folder: str | Path, name: str, severity: int) -> tuple[Tensor, Tensor]:
    """One corruption at one severity from the published CIFAR-10-C files: ``(images float [0, 1] (N, 3, 32, 32),
    labels int64 (N,))``, N = 10,000 for the published files.

    ``<folder>/<name>.npy`` is uint8 (5 N, 32, 32, 3), severities 1..5 stacked N each, and ``<folder>/labels.npy``
    their 5 N labels. Reads only that severity's slice (memory-mapped). Raises ``ValueError`` for a bad name or
    severity and ``data.CIFAR10DataError`` (a ``ValueError``) for a missing or malformed file, naming it.
    """
    check_corruption(name, severity)
    folder = Path(folder)
    images, labels = _load_npy(folder / f"{name}.npy"), _load_npy(folder / "labels.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3) or len(images) % 5:
        raise CIFAR10DataError(f"{folder / f'{name}.npy'} is {images.dtype} {images.shape}, expected uint8 "
                               f"(5 N, 32, 32, 3): N images for each of the 5 severities. {_FIX}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise CIFAR10DataError(f"{folder / 'labels.npy'} is {labels.dtype} {labels.shape}, expected "
                               f"{len(images)} integer labels, one per image of {name}.npy. {_FIX}")
    per_severity = len(images) // 5
    rows = slice((severity - 1) * per_severity, severity * per_severity)
    return from_uint8_hwc(np.array(images[rows])), torch.from_numpy(labels[rows].astype(np.int64))
