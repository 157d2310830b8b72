"""Gradient attacks in [0, 1] pixel space, via torchattacks, and BPDA for defended models.

Every model given here takes [0, 1] images (``models.Normalized``), so ε is in pixel units.
"""

import torch
import torchattacks
from torch import Tensor, nn

from cifar_lightning.defenses import Defense


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps={eps} must be in [0, 1] (pixel scale; 8/255 ≈ 0.031 is common for CIFAR-10)")


def fgsm(model: nn.Module, eps: float = 0.03) -> torchattacks.FGSM:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): x + ε·sign(∇ₓ loss), clipped to [0, 1]."""
    _check_eps(eps)
    return torchattacks.FGSM(model, eps=eps)


def pgd(model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
        random_start: bool = True) -> torchattacks.PGD:
    """Projected Gradient Descent (Madry et al. 2018): ``steps`` FGSM steps of size ``alpha``,
    each projected back into the L∞ ball of radius ``eps``; the standard strong first-order attack."""
    _check_eps(eps)
    if steps < 1 or alpha <= 0:
        raise ValueError(f"pgd: steps={steps} must be >= 1 and alpha={alpha} > 0")
    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)


def run_attack(attack: torchattacks.attack.Attack, images: Tensor, labels: Tensor) -> Tensor:
    """Adversarial images (N, 3, H, W) in [0, 1] for ``images`` of that shape.

    Works inside ``torch.inference_mode()`` and ``torch.no_grad()`` too (``trainer.test`` runs
    under them): gradients are switched back on and the inputs copied into ordinary tensors,
    since inference tensors cannot take part in autograd. The model is run in eval mode and its
    mode restored afterwards (torchattacks does this).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return attack(images.clone(), labels.clone())


class _StraightThrough(torch.autograd.Function):
    """Forward: the defense. Backward: the identity (the defense is treated as f(x) ≈ x)."""

    @staticmethod
    def forward(ctx, images: Tensor, defense: Defense) -> Tensor:
        return defense(images.detach())

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output, None


class BPDA(nn.Module):
    """Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner 2018, "Obfuscated
    Gradients Give a False Sense of Security"): ``model(defense(x))`` whose gradient with respect
    to x is that of ``model`` at ``defense(x)``, as if the defense were the identity.

    Attacking ``BPDA(model, defense)`` with any gradient attack is an adaptive attack on the
    defended model: the attacker knows the defense and attacks through it.
    Input and output as ``model``: [0, 1] images (N, 3, H, W) → logits.
    """

    def __init__(self, model: nn.Module, defense: Defense) -> None:
        super().__init__()
        self.model, self.defense = model, defense

    def forward(self, images: Tensor) -> Tensor:
        return self.model(_StraightThrough.apply(images, self.defense))
