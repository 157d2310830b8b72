"""Test-time stages and FP32 vs int8 CPU latency: the default callbacks on part of the test set.

Runs `RobustnessEvaluation` and `QuantizationEvaluation` (default config values) with the shipped
weights through `Trainer.test` and prints the wall time per stage and the size/latency table.

    python benchmarks/evaluation_stages.py --data_dir ../shared/cifar10 --images 1000
"""

import argparse
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.quantization import QuantizationEvaluation
from callbacks.robustness import RobustnessEvaluation
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.module import ClassifierModule

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/cifar10")
    parser.add_argument("--images", type=int, default=1000, help="test images (a multiple of 100)")
    args = parser.parse_args()

    robustness = RobustnessEvaluation()
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(logs), enable_model_summary=False,
                            callbacks=[robustness, QuantizationEvaluation()], limit_test_batches=args.images // 100)
        module = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu")
        trainer.test(module, CIFAR10DataModule(data_dir=args.data_dir, batch_size=100), verbose=False)
    report = robustness.report
    print(f"\n{args.images} test images, wall time per stage:")
    print(report.timings_frame().to_markdown(index=False, floatfmt=".1f"))
    columns = ["model", "size_mb", "cpu_ms_per_batch", "cpu_images_per_s", "cpu_threads", "clean_acc", "fgsm_acc"]
    print("\nCPU latency (batch 128), size and accuracy:")
    print(report.summary_frame()[columns].to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
