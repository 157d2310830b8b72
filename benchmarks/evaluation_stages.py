"""Test-time stages, with the fast path and without, side by side in one run; FP32 vs int8 CPU latency.

Runs the study of `cifar-lightning test` (RobustnessEvaluation and QuantizationEvaluation, default
values) on the shipped weights through `cifar_lightning.evaluate`, twice: on the frozen copy with
BatchNorm folded (`fast=True`, the default) and on the eager network (`fast=False`). Prints the wall
time per stage of each, how many rows agree, and the size/latency table.

    python benchmarks/evaluation_stages.py --data_dir ../shared/cifar10 --images 1000
"""

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from cifar_lightning import evaluate
from cifar_lightning.module import ClassifierModule

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/cifar10")
    parser.add_argument("--images", type=int, default=1000, help="the first this many test images")
    args = parser.parse_args()

    network = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").net.model
    runs, walls = {}, {}
    for fast in (True, False):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            # The strong attacks on a tenth of the images, as the default study's 1,000 of 10,000.
            runs[fast] = evaluate(network, args.data_dir, images=args.images, subset=max(1, args.images // 10),
                                  runs_dir=folder, fast=fast, progress=False)
        walls[fast] = time.perf_counter() - start
    stages = pd.concat({f"fast={fast}": runs[fast].stage_times.set_index("stage")["seconds"] for fast in runs}, axis=1)
    stages.loc["wall time"] = [walls[True], walls[False]]
    stages["fast=False / fast=True"] = stages["fast=False"] / stages["fast=True"]
    print(f"\n{args.images} test images, wall seconds per stage:")
    print(stages.to_markdown(floatfmt=".2f"))
    fast, eager = (runs[f].results.set_index(["model", "input"])["acc"] for f in (True, False))
    difference = (fast - eager).abs() * 100
    print(f"\nAccuracy, fast against eager, {len(difference)} rows: {int((difference == 0).sum())} identical, the largest "
          f"difference {difference.max():.2f} points ({difference.idxmax()[0]} {difference.idxmax()[1]}).")
    columns = ["model", "size_mb", "cpu_ms_per_batch", "cpu_images_per_s", "cpu_threads", "clean_acc", "fgsm_acc"]
    print("\nCPU latency (batch 128), size and accuracy (fast):")
    print(runs[True].summary[columns].to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
