"""Adversarial training: the perturbed batch a training step learns from.

Madry et al. 2018 train on PGD examples; Wong, Rice & Kolter 2020 ("Fast is better than free")
showed one FGSM step from a random start does nearly as well at a fraction of the cost; de Jorge
et al. 2022 (N-FGSM) add larger noise and drop the projection, which avoids the "catastrophic
overfitting" of FGSM training at the same cost.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torchattacks
from torch import Tensor, nn

from cifar_lightning.attacks import check_at_least_one, check_eps

METHODS = ("none", "fgsm_rs", "n_fgsm", "pgd")


@contextmanager
def kept_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Put every BatchNorm running statistic back as it was: crafting the perturbation runs the
    model in training mode, and only the training step's own forward pass should move them."""
    saved = [(buffer, buffer.clone()) for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
             for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class TrainingAttack:
    """The perturbation of an augmented [0, 1] training batch (N, 3, H, W), made inside the step.

    The model is attacked as the training step runs it, in training mode: BatchNorm normalises
    with the batch's statistics and dropout is on, so the perturbation targets the very function
    the loss is taken on (as in Wong et al. 2020); the BatchNorm running statistics are restored
    afterwards (:func:`kept_batchnorm_statistics`).

    Methods:
        ``none``: the batch unchanged: the standard recipe, bit for bit.
        ``fgsm_rs``: FGSM from a uniform random start in the ε-ball, step ``alpha`` (default 1.25·ε),
            projected back into the ball (Wong, Rice & Kolter 2020; ``torchattacks.FFGSM``).
        ``n_fgsm``: noise uniform in [-2ε, 2ε], one FGSM step of ``alpha`` (default ε) from there,
            no projection: the perturbation stays within 3ε (de Jorge et al. 2022).
        ``pgd``: ``steps`` steps of ``alpha`` (default 2.5·ε/steps) from a random start, projected
            (Madry et al. 2018; ``torchattacks.PGD``): the reference, ``steps`` times the cost.

    Every result is clipped to [0, 1]. On CUDA with AMP the attack runs under the step's autocast.

    Args:
        method: one of ``none``, ``fgsm_rs``, ``n_fgsm``, ``pgd``.
        eps: budget in (0, 1] pixel space (L∞); 8/255 is the common CIFAR-10 benchmark.
        alpha: step size; None for the method's default above.
        steps: PGD's steps (other methods take one).
    """

    def __init__(self, method: str = "none", eps: float = 8 / 255, alpha: float | None = None, steps: int = 10) -> None:
        if method not in METHODS:
            raise ValueError(f"TrainingAttack: method={method!r} must be one of {', '.join(METHODS)}")
        check_eps("TrainingAttack", eps, allow_zero=method == "none")  # `none` does not use it
        check_at_least_one("TrainingAttack", steps=steps)
        if alpha is not None and not alpha > 0:  # also refuses NaN
            raise ValueError(f"TrainingAttack: alpha={alpha} must be > 0 (a step size in pixel scale), or null")
        default_alpha = {"none": 0.0, "fgsm_rs": 1.25 * eps, "n_fgsm": eps, "pgd": 2.5 * eps / steps}[method]
        self.method, self.eps, self.steps = method, eps, steps
        self.alpha = default_alpha if alpha is None else alpha

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        if self.method == "none":
            return images
        with kept_batchnorm_statistics(model):
            if self.method == "n_fgsm":
                return self._n_fgsm(model, images, labels)
            attack = (torchattacks.FFGSM(model, eps=self.eps, alpha=self.alpha) if self.method == "fgsm_rs" else
                      torchattacks.PGD(model, eps=self.eps, alpha=self.alpha, steps=self.steps, random_start=True))
            attack.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)
            return attack(images, labels)

    def _n_fgsm(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        start = (images + torch.empty_like(images).uniform_(-2 * self.eps, 2 * self.eps)).clamp(0, 1)
        start.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(start), labels)
        [grad] = torch.autograd.grad(loss, start)
        return (start.detach() + self.alpha * grad.sign()).clamp(0, 1)

    def __repr__(self) -> str:
        return f"TrainingAttack(method={self.method!r}, eps={self.eps:.4f}, alpha={self.alpha:.4f}, steps={self.steps})"
