"""Test-time stages and FP32 vs int8 CPU latency: the default study on part of the test set.

Runs the study of `cifar-lightning test` (RobustnessEvaluation and QuantizationEvaluation, default
values) on the shipped weights through `cifar_lightning.evaluate`, and prints the wall time per
stage and the size/latency table.

    python benchmarks/evaluation_stages.py --data_dir ../shared/cifar10 --images 1000
"""

import argparse
import tempfile
from pathlib import Path

from cifar_lightning import evaluate
from cifar_lightning.module import ClassifierModule

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/cifar10")
    parser.add_argument("--images", type=int, default=1000, help="the first this many test images")
    args = parser.parse_args()

    network = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").net.model
    with tempfile.TemporaryDirectory() as runs:
        # The strong attacks on a tenth of the images, as the default study's 1,000 of 10,000.
        results = evaluate(network, args.data_dir, images=args.images, subset=max(1, args.images // 10),
                           batch_size=100, runs_dir=runs)
    print(f"\n{args.images} test images, wall time per stage:")
    print(results.stage_times.to_markdown(index=False, floatfmt=".1f"))
    columns = ["model", "size_mb", "cpu_ms_per_batch", "cpu_images_per_s", "cpu_threads", "clean_acc", "fgsm_acc"]
    print("\nCPU latency (batch 128), size and accuracy:")
    print(results.summary[columns].to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
