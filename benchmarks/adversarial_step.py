"""Cost of an adversarial training step against a clean one, side by side in one process.

Each method runs the same training step — the perturbation of `adversarial.TrainingAttack`, then
forward, backward and an SGD step — on Normalized ImprovedCNN (channels_last, training mode) with
the same augmented CIFAR-10 batches; the order rotates over repeats, the median is reported.

    python benchmarks/adversarial_step.py --data_dir ../shared/cifar10 --steps 20 --repeats 3
"""

import argparse
import statistics
import time

import torch
from torch import nn

from cifar_lightning.adversarial import TrainingAttack
from cifar_lightning.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, random_crop_flip
from cifar_lightning.models import ImprovedCNN, Normalized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/cifar10")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    images, labels = load_cifar10(args.data_dir, train=True)
    torch.manual_seed(0)
    net = Normalized(ImprovedCNN(), CIFAR10_MEAN, CIFAR10_STD).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    methods = {"clean": TrainingAttack("none"), "fgsm_rs": TrainingAttack("fgsm_rs"),
               "n_fgsm": TrainingAttack("n_fgsm"), "pgd (7 steps)": TrainingAttack("pgd", steps=7)}

    def run(attack: TrainingAttack, steps: int) -> float:
        start = time.perf_counter()
        for step in range(steps):
            batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
            x = random_crop_flip(images[batch]).float().div(255).contiguous(memory_format=torch.channels_last)
            y = labels[batch]
            loss = nn.functional.cross_entropy(net(attack(net, x, y)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    seconds = {name: [] for name in methods}
    for repeat in range(args.repeats):
        names = list(methods)
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            run(methods[name], args.warmup)
            seconds[name].append(run(methods[name], args.steps) / args.steps)
    clean = statistics.median(seconds["clean"])
    print(f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads\n")
    print("| training step | ms / step (median) | images/s | vs clean |\n| --- | ---: | ---: | ---: |")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.0f} | {args.batch_size / median:.0f} | {median / clean:.2f} |")


if __name__ == "__main__":
    main()
