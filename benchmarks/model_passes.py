"""The study's model passes, side by side in one process: the FP32 model and its int8 dynamic copy one
after the other, against one joint pass of both (`frozen.joint_pass`: the convolutions before the int8
Linear layers run once).

All: the shipped weights' frozen copy (BatchNorm folded, as the study runs it) and its int8 dynamic
copy, on the CPU, the same test images in batches of 128 (the data module's), channels_last, under
inference mode. The order alternates over repeats to share out drift; the median is reported with
the range, and the joint pass's logits are checked equal to each model's own.

    python benchmarks/model_passes.py --data_dir ../shared/cifar10 --images 1280 --repeats 5
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from cifar_lightning.data import load_cifar10
from cifar_lightning.frozen import frozen_copy, joint_pass
from cifar_lightning.module import ClassifierModule
from cifar_lightning.quantization import quantize_dynamic_linear

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/cifar10")
    parser.add_argument("--images", type=int, default=1280, help="the first this many test images")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    net = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").net
    fp32 = frozen_copy(net)
    dynamic = quantize_dynamic_linear(fp32)
    joint = joint_pass(fp32, dynamic)
    images, _ = load_cifar10(args.data_dir, train=False)
    batches = [batch.float().div(255).contiguous(memory_format=torch.channels_last)
               for batch in images[: args.images].split(128)]
    ways = {"fp32, then int8_dynamic": lambda batch: (fp32(batch), dynamic(batch)), "joint pass": joint}
    seconds = {name: [] for name in ways}
    with torch.inference_mode():
        for batch in batches:  # the same logits, and a warm-up
            both, together = ways["fp32, then int8_dynamic"](batch), joint(batch)
            assert all(torch.equal(a, b) for a, b in zip(both, together)), "the joint pass's logits differ"
        for repeat in range(args.repeats):
            for name in list(ways)[:: 1 if repeat % 2 == 0 else -1]:
                start = time.perf_counter()
                for batch in batches:
                    ways[name](batch)
                seconds[name].append(time.perf_counter() - start)
    print(f"{len(images[: args.images])} test images, both models' logits, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats:")
    rates = {name: [len(images[: args.images]) / s for s in times] for name, times in seconds.items()}
    for name, rate in rates.items():
        print(f"  {name:24s} {statistics.median(rate):7.1f} images/s (range {min(rate):.1f}–{max(rate):.1f})")
    print(f"  ratio: {statistics.median(rates['joint pass']) / statistics.median(rates['fp32, then int8_dynamic']):.2f}×")


if __name__ == "__main__":
    main()
