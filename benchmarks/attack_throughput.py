"""Attack throughput, side by side in one process: the project's PGD (``attacks.PGD``) and APGD-T
(torchattacks), via `attacks.run_attack`, on the eager network and on the study's frozen copy (`frozen.frozen_copy`,
BatchNorm folded), against a raw PyTorch loop of the same PGD on the eager network.

All: the shipped weights (Normalized ImprovedCNN, eval mode, channels_last), the same test images
and batch size, ε = 8/255, weights frozen (the attack needs the gradient for the image only). PGD:
step 2.5·ε/steps, random start, every image stepped to the end (``stop_when_fooled=False``: the
study's PGD stops on broken images, which is fewer steps, not faster ones); APGD-T: ``--steps`` for each of the 9 target classes. Reported in
images × gradient steps per second; the order alternates over repeats to share out drift, and the
median is reported with the range.

    python benchmarks/attack_throughput.py --data_dir ../shared/cifar10 --images 512 --steps 10 --repeats 5
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchattacks
from torch import Tensor, nn

from cifar_lightning.attacks import pgd, run_attack
from cifar_lightning.data import load_cifar10
from cifar_lightning.frozen import frozen_copy
from cifar_lightning.module import ClassifierModule

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"


def raw_pgd(model: nn.Module, images: Tensor, labels: Tensor, eps: float, steps: int) -> Tensor:
    """PGD (Madry et al. 2018) written out: random start, signed-gradient steps, projection."""
    alpha = 2.5 * eps / steps
    adversarial = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(adversarial), labels)
        [grad] = torch.autograd.grad(loss, adversarial)
        adversarial = adversarial.detach() + alpha * grad.sign()
        adversarial = torch.min(torch.max(adversarial, images - eps), images + eps).clamp(0, 1)
    return adversarial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/cifar10")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").net.eval()
    frozen = frozen_copy(model)
    images, labels = load_cifar10(args.data_dir, train=False)
    images = images[: args.images].float().div(255).contiguous(memory_format=torch.channels_last)
    labels = labels[: args.images]
    eps, targets = 8 / 255, 9

    def apgd_t(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return run_attack(torchattacks.APGDT(net, eps=eps, steps=args.steps, n_classes=targets + 1), x, y)

    def project_pgd(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return run_attack(pgd(net, eps, args.steps, stop_when_fooled=False), x, y)

    attacks = {  # name → (attack, gradient steps per image)
        "PGD, eager network (run_attack)": (lambda x, y: project_pgd(model, x, y), 1),
        "PGD, frozen copy": (lambda x, y: project_pgd(frozen, x, y), 1),
        "PGD, raw PyTorch loop, eager network": (lambda x, y: raw_pgd(model.requires_grad_(False), x, y, eps, args.steps), 1),
        "APGD-T, eager network": (lambda x, y: apgd_t(model, x, y), targets),
        "APGD-T, frozen copy": (lambda x, y: apgd_t(frozen, x, y), targets),
    }
    rates = {name: [] for name in attacks}
    for repeat in range(args.repeats):
        for name in list(attacks)[:: 1 if repeat % 2 == 0 else -1]:
            attack, per_image = attacks[name]
            start = time.perf_counter()
            for batch in range(0, args.images, args.batch_size):
                attack(images[batch : batch + args.batch_size], labels[batch : batch + args.batch_size])
            rates[name].append(args.images * args.steps * per_image / (time.perf_counter() - start))
    model.requires_grad_(True)
    raw = statistics.median(rates["PGD, raw PyTorch loop, eager network"])
    print(f"{args.steps} steps (APGD-T: for each of {targets} targets), {args.images} images, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats\n")
    print("| attack | images × steps / s (median) | range | vs raw PGD loop |\n| --- | ---: | ---: | ---: |")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {min(values):.0f}–{max(values):.0f} | {median / raw:.3f} |")


if __name__ == "__main__":
    main()
