"""How close the OpenCV motion blur of ``cifar_lightning.corruptions`` is to ImageMagick's, which the published
CIFAR-10-C generator calls (through Wand: ``motion_blur(radius, sigma, angle)`` is ``MagickMotionBlurImage``, the
same as ``convert -motion-blur {radius}x{sigma}+{angle}``).

    .venv/bin/python scripts/compare_imagemagick.py [--images 20] [--data ../shared/cifar10]

For each severity it blurs the first test images (random images if the data is absent) at the severity's radius
and σ and a random angle in the published range with both, and prints the mean absolute difference in grey levels
(0-255) and the largest one: for motion_blur on the RGB images, and for snow's flake blur on snow layers made as
snow makes them. ImageMagick is not a dependency of the project: without ``convert`` (e.g. ``apt-get install
imagemagick``) the script says so in one line and exits with status 1.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_lightning import corruptions

REPO = Path(__file__).resolve().parents[1]


def imagemagick_motion_blur(convert: str, image: np.ndarray, radius: float, sigma: float, angle: float,
                            folder: Path) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) → ImageMagick's motion blur of it, through PNG files as the published code."""
    source, target = folder / "in.png", folder / "out.png"
    Image.fromarray(image).save(source)
    # The geometry RADIUSxSIGMA+ANGLE, its sign part of the number: 6x1+30, 6x1-30.
    subprocess.run([convert, str(source), "-motion-blur", f"{radius}x{sigma}{angle:+}", str(target)],
                   check=True, capture_output=True)
    blurred = np.asarray(Image.open(target))
    return blurred if blurred.ndim == image.ndim else np.asarray(Image.open(target).convert(
        "RGB" if image.ndim == 3 else "L"))


def snow_layer(rng: np.random.Generator, params: tuple) -> np.ndarray:
    """The uint8 (32, 32) flake layer that snow blurs, made as ``corruptions.snow`` makes it."""
    mean, std, zoom, threshold = params[:4]
    flakes = corruptions._clipped_zoom(rng.normal(mean, std, (32, 32, 1)), zoom)[..., 0]
    flakes[flakes < threshold] = 0
    return corruptions._to_uint8(flakes)


def load_images(data: Path, count: int) -> np.ndarray:
    if (data / "test.npz").is_file():
        with np.load(data / "test.npz") as archive:
            return archive["images"][:count]
    print(f"no {data / 'test.npz'}: random images instead")
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="test images (and snow layers) per severity")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "cifar10", help="folder with test.npz")
    args = parser.parse_args()
    convert = shutil.which("convert", path="/usr/bin:/usr/local/bin:/bin")
    version = subprocess.run([convert, "-version"], capture_output=True, text=True).stdout if convert else ""
    if "ImageMagick" not in version:
        sys.exit("compare_imagemagick: no ImageMagick `convert` here (Debian: apt-get install imagemagick)")
    print(version.splitlines()[0])
    images = load_images(args.data, args.images)
    rng = np.random.default_rng(0)
    print("what          severity  radius  sigma  mean |diff|  max |diff|   (grey levels 0-255)")
    with tempfile.TemporaryDirectory() as folder:
        for what, angles, inputs in (("motion_blur", (-45, 45), lambda severity: images),
                                     ("snow (flakes)", (-135, -45), lambda severity: [
                                         snow_layer(rng, corruptions.PARAMETERS["snow"][severity - 1])
                                         for _ in range(args.images)])):
            for severity in corruptions.SEVERITIES:
                params = corruptions.PARAMETERS["motion_blur" if what == "motion_blur" else "snow"][severity - 1]
                radius, sigma = params[:2] if what == "motion_blur" else params[4:6]
                differences = []
                for image in inputs(severity):
                    angle = rng.uniform(*angles)
                    ours = corruptions._motion_blur(image, radius, sigma, angle).astype(int)
                    theirs = imagemagick_motion_blur(convert, image, radius, sigma, angle, Path(folder)).astype(int)
                    differences.append(np.abs(ours - theirs))
                differences = np.array(differences)
                print(f"{what:14s}{severity:5d}{radius:10g}{sigma:7g}{differences.mean():12.3f}"
                      f"{differences.max():12d}")


if __name__ == "__main__":
    main()
