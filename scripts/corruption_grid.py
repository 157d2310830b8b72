"""The 15 CIFAR-10-C corruptions on one test image: docs/figures/corruptions.png.

    .venv/bin/python scripts/corruption_grid.py [--index 9] [--data ../shared/cifar10] [--out PATH]

Rows are the corruptions (in ``corruptions.CORRUPTIONS`` order, grouped), columns the clean image and severities
1-5, each made by ``corruptions.corrupt`` with seed 0 and the image's test-set index, so the figure is the same on
every run. Without the data it uses a random image and says so.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cifar_lightning import corruptions  # noqa: E402
from cifar_lightning.data import CLASSES, from_uint8_hwc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_image(data: Path, index: int) -> tuple[np.ndarray, str]:
    """uint8 (32, 32, 3) test image ``index`` and its class name (a random image if there is no test.npz)."""
    if (data / "test.npz").is_file():
        with np.load(data / "test.npz") as archive:
            return archive["images"][index], CLASSES[int(archive["labels"][index])]
    print(f"no {data / 'test.npz'}: a random image instead")
    return np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8), "random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=int, default=9, help="test-set index of the image (9: a car)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "cifar10", help="folder with test.npz")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures" / "corruptions.png")
    args = parser.parse_args()
    image, label = load_image(args.data, args.index)
    clean = from_uint8_hwc(image[None])
    indices = torch.tensor([args.index])
    rows = len(corruptions.CORRUPTIONS)
    figure, axes = plt.subplots(rows, 6, figsize=(6 * 1.35 + 0.8, rows * 1.35 + 0.6), layout="constrained")
    group_of = {name: group for group, names in corruptions.GROUPS.items() for name in names}
    for row, name in enumerate(corruptions.CORRUPTIONS):
        versions = [clean] + [corruptions.corrupt(clean, name, severity, indices=indices)
                              for severity in corruptions.SEVERITIES]
        for column, version in enumerate(versions):
            axis = axes[row, column]
            axis.imshow(version[0].permute(1, 2, 0).numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title("clean" if column == 0 else f"severity {column}", fontsize=8)
        axes[row, 0].set_ylabel(f"{name}\n({group_of[name]})", fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle(f"CIFAR-10-C corruptions, test image {args.index} ({label})", fontsize=9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
