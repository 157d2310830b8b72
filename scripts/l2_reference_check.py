"""The project's L2 attacks beside references, image by image, on the robust weights.

    # the official AutoAttack is not on PyPI: clone github.com/fra31/auto-attack and pass its folder
    .venv/bin/python scripts/l2_reference_check.py --reference ../auto-attack --data_dir ../shared/cifar10

Runs each L2 attack the study uses at ``--eps`` (default 0.5) on the first ``--images`` test images and
prints, per attack, the robust accuracy of the project's and of its reference, and the images only one of
the two broke:

- PGD-L2 (``attacks.pgd(norm="L2")``: torchattacks' PGDL2 steps, each image's first adversarial
  iterate kept) against a PGD-L2 loop written out here
  (Madry et al. 2018: a random start in the ball, gradient steps of length α, projection onto the ball);
- APGD-CE and APGD-T under L2 (``attacks.ensemble_member(norm="L2")``) against the official AutoAttack's
  ``APGDAttack`` and ``APGDAttack_targeted`` (100 iterations, 9 targets, seed 0, as its standard version),
  and, for APGD-T, torchattacks' own ``APGDT``, whose L2 steps use the first image's step size for the
  whole batch (``attacks.APGDT``).

Random starts are drawn differently by each, so a few images can go either way; a systematic set of
images broken by the reference only would be a weaker attack. Without ``--reference`` only PGD-L2 runs.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torchattacks

from cifar_lightning.attacks import ensemble_member, pgd, run_attack
from cifar_lightning.data import load_cifar10
from cifar_lightning.frozen import frozen_copy
from cifar_lightning.loading import load_model
from cifar_lightning.models import CIFAR10_NORMALIZATION, ImprovedCNN, pixel_input

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10_adv.ckpt"


def pgd_l2_loop(model, images, labels, eps: float, steps: int, seed: int = 0):
    """PGD under L2 as written in the paper, for reference: start uniformly in radius along a Gaussian
    direction, then ``steps`` steps of length 2.5·ε/steps along the normalised gradient of the
    cross-entropy, each projected onto the ε-ball and [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    alpha = 2.5 * eps / steps

    def lengths(t):
        return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    direction = torch.randn(images.shape, generator=generator)
    radius = torch.rand(len(images), 1, 1, 1, generator=generator) * eps
    adversarial = (images + direction / lengths(direction) * radius).clamp(0, 1)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(adversarial), labels)
        gradient = torch.autograd.grad(loss, adversarial)[0]
        step = adversarial.detach() + alpha * gradient / lengths(gradient)
        delta = step - images
        adversarial = (images + delta * (eps / lengths(delta)).clamp(max=1.0)).clamp(0, 1).detach()
    return adversarial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, help="a clone of github.com/fra31/auto-attack")
    parser.add_argument("--data_dir", type=Path, default=Path("data"))
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.5)
    args = parser.parse_args()
    if not args.eps > 0:
        sys.exit(f"--eps {args.eps} must be a positive L2 length, e.g. 0.5")
    network = load_model(args.weights, ImprovedCNN())
    model = frozen_copy(pixel_input(network, CIFAR10_NORMALIZATION).eval())  # as `cifar-lightning test`
    images, labels = load_cifar10(args.data_dir, train=False)
    x, y = images[: args.images].float().div(255), labels[: args.images]
    eps = args.eps

    attacks = {"PGD-L2, 20 steps": (lambda: run_attack(pgd(model, eps, 20, norm="L2"), x, y),
                                    {"loop written out": lambda: pgd_l2_loop(model, x, y, eps, 20)})}
    if args.reference is not None:
        if not (args.reference / "autoattack" / "autopgd_base.py").is_file():
            sys.exit(f"--reference {args.reference} holds no autoattack/autopgd_base.py. Fix: pass the folder of a "
                     f"clone of github.com/fra31/auto-attack")
        sys.path.insert(0, str(args.reference))
        from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted

        official_ce = APGDAttack(model, n_iter=100, norm="L2", n_restarts=1, eps=eps, seed=0, loss="ce", device="cpu")
        official_t = APGDAttack_targeted(model, n_iter=100, norm="L2", n_restarts=1, eps=eps, seed=0,
                                         n_target_classes=9, device="cpu")
        torchattacks_t = torchattacks.APGDT(model, norm="L2", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0)
        attacks["APGD-CE (L2)"] = (lambda: run_attack(ensemble_member("apgd-ce", model, eps, norm="L2"), x, y),
                                   {"official AutoAttack": lambda: official_ce.perturb(x, y)})
        attacks["APGD-T (L2)"] = (lambda: run_attack(ensemble_member("apgd-t", model, eps, norm="L2"), x, y),
                                  {"official AutoAttack": lambda: official_t.perturb(x, y),
                                   "torchattacks.APGDT": lambda: run_attack(torchattacks_t, x, y)})
    else:
        print("no --reference: APGD-CE and APGD-T under L2 are not compared (clone github.com/fra31/auto-attack)")

    with torch.no_grad():
        clean = model(x).argmax(1) == y
    print(f"{args.images} test images, {int(clean.sum())} right when clean, L2 ε = {eps}")
    for name, (ours, references) in attacks.items():
        found = {"cifar-lightning": ours, **references}
        robust = {}
        for who, attack in found.items():
            started = time.perf_counter()
            adversarial = attack()
            seconds = time.perf_counter() - started
            length = (adversarial - x).flatten(1).norm(dim=1).max().item()
            with torch.no_grad():
                robust[who] = clean & (model(adversarial).argmax(1) == y)
            print(f"{name:18} {who:20} robust {robust[who].float().mean():7.2%}   largest L2 {length:.4f}   {seconds:5.0f} s")
        mine = robust["cifar-lightning"]
        for who in references:
            print(f"{'':18} broken by {who} only: {(mine & ~robust[who]).nonzero().flatten().tolist()}; "
                  f"by cifar-lightning only: {(~mine & robust[who]).nonzero().flatten().tolist()}")


if __name__ == "__main__":
    main()
