"""Gradient attacks in [0, 1] pixel space, via torchattacks, and the attacker's view of a defense.

Every model given here takes [0, 1] images (``models.Normalized``), so ε is in pixel units, in the
threat model's norm (:data:`NORMS`): L∞ (every pixel moves by at most ε) or L2 (the perturbation's
Euclidean length over all 3·H·W values is at most ε; 0.5 is RobustBench's CIFAR-10 budget).
An attack is a function of (model, images, labels) that returns adversarial images and leaves the
model exactly as it found it: the mode of every submodule, BatchNorm statistics, weights, the
weights' ``requires_grad`` and ``.grad``, and the global random stream (:func:`run_attack`).
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import math

import torch
import torchattacks
from torch import Tensor, nn

from cifar_lightning.defenses import Defense

# The AutoAttack members (Croce & Hein 2020) in the paper's order, with the budgets of its standard
# version: member → (name in tables, steps (Square: queries), restarts).
ENSEMBLE_BUDGETS = {"apgd-ce": ("APGD-CE", 100, 1), "apgd-t": ("APGD-T (9 targets)", 100, 1),
                    "fab-t": ("FAB-T (9 targets)", 100, 1), "square": ("Square", 5000, 1)}
ENSEMBLE_MEMBERS = tuple(ENSEMBLE_BUDGETS)

# AutoAttack's versions: name → its members in order, run from the clean images with the budgets above.
# "standard" is the published one (Croce & Hein 2020), whose last row is the AutoAttack accuracy. "apgd" is
# its first two members alone, the official implementation's attacks_to_run=['apgd-ce', 'apgd-t']: a fifth
# of the cost, for comparing it with the official one member by member (scripts/autoattack_parity.py).
AUTOATTACK_VERSIONS = {"standard": ENSEMBLE_MEMBERS, "apgd": ENSEMBLE_MEMBERS[:2]}

# The official AutoAttack's settings (github fra31/auto-attack, autoattack.py) where they are not
# torchattacks' defaults, or could drift with them: FAB-T's step parameters, and Square's schedule. With
# torchattacks' default resc_schedule=True, Square at 5,000 queries would shrink its squares on the
# schedule of 10,000, twice as fast as the paper's.
FAB_SETTINGS = {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9}
SQUARE_SETTINGS = {"p_init": 0.8, "loss": "margin", "resc_schedule": False}


# The threat models: the norm the budget ε bounds.
NORMS = ("Linf", "L2")


def check_budget(owner: str, eps: float, norm: str) -> None:
    """Refuse an unknown threat model, then a budget that threat model cannot take."""
    if norm not in NORMS:
        raise ValueError(f"{owner}: norm={norm!r} is not a threat model; choose from {', '.join(NORMS)}")
    if norm == "Linf":
        check_eps(owner, eps)
    else:
        check_l2_eps(owner, eps)


def check_l2_eps(owner: str, eps: float, name: str = "eps") -> None:
    """Refuse an L2 budget that is not a positive finite number (L2 budgets may exceed 1: a
    perturbation of 1/255 on every value of a CIFAR-10 image has length √3072/255 ≈ 0.22)."""
    if not (isinstance(eps, (int, float)) and 0.0 < eps < math.inf):  # also refuses NaN
        raise ValueError(f"{owner}: {name}={eps} must be a positive number (L2 length in pixel scale; 0.5 is "
                         f"RobustBench's CIFAR-10 budget)")


def check_eps(owner: str, eps: float, name: str = "eps", allow_zero: bool = False) -> None:
    """Refuse an L∞ budget outside (0, 1], or [0, 1] with ``allow_zero`` (an ε sweep, whose 0 is its clean
    point): an attack of budget 0 would run and change no image."""
    low_ok = eps >= 0.0 if allow_zero else eps > 0.0
    if not (low_ok and eps <= 1.0):  # also refuses NaN
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        why = ": a budget of 0 attacks nothing" if eps == 0 else ""
        raise ValueError(f"{owner}: {name}={eps} must be in {interval}{why} (pixel scale; 8/255 ≈ 0.031 is common "
                         f"for CIFAR-10)")


def check_at_least_one(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name}={value!r} must be an integer >= 1")


def fgsm(model: nn.Module, eps: float = 0.03) -> torchattacks.FGSM:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): x + ε·sign(∇ₓ loss), clipped to [0, 1]."""
    check_eps("fgsm", eps)
    return torchattacks.FGSM(model, eps=eps)


def fgsm_at_budgets(model: nn.Module, images: Tensor, labels: Tensor, budgets: Sequence[float]) -> list[Tensor]:
    """FGSM at each ε of ``budgets`` from one gradient: x + ε·sign(∇ₓ loss) does not depend on ε but
    through the step, so one forward and backward pass serves every budget. Each result equals
    ``run_attack(fgsm(model, ε), images, labels)`` exactly (tests/test_attacks.py).

    Args:
        model: a classifier of [0, 1] images (left as it was, as by :func:`run_attack`).
        images, labels: (N, 3, H, W) in [0, 1] and (N,).
        budgets: the ε of each result, in (0, 1].

    Returns:
        One (N, 3, H, W) batch of adversarial images per budget, in order.
    """
    for eps in budgets:
        check_eps("fgsm", eps)
    with torch.inference_mode(False), torch.enable_grad(), untouched(model):
        clean = images.clone().requires_grad_(True)
        # The loss torchattacks.FGSM takes the gradient of: the mean cross-entropy of the batch.
        loss = nn.functional.cross_entropy(model(clean), labels.clone())
        sign = torch.autograd.grad(loss, clean)[0].sign()
        return [(clean + eps * sign).clamp(0, 1).detach() for eps in budgets]


class FGM(torchattacks.attack.Attack):
    """Fast Gradient Method, FGSM's L2 form (Goodfellow et al. 2015; Miyato et al. 2017): one step of
    length ε along the loss gradient, ``x + ε·∇ₓ loss / ‖∇ₓ loss‖₂`` per image, clipped to [0, 1]
    (clipping only shortens the step). Images (N, C, H, W) in [0, 1] and labels (N,) in, adversarial
    images of that shape out."""

    norm = "L2"

    def __init__(self, model: nn.Module, eps: float = 0.5) -> None:
        check_l2_eps("fgm", eps)
        super().__init__("FGM", model)
        self.eps = eps
        self.supported_mode = ["default"]

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        images = images.clone().detach().to(self.device).requires_grad_(True)
        loss = nn.functional.cross_entropy(self.get_logits(images), labels.to(self.device))
        gradient = torch.autograd.grad(loss, images)[0]
        length = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (images + self.eps * gradient / length).clamp(0, 1).detach()


def pgd(model: nn.Module, eps: float = 8 / 255, steps: int = 10, alpha: float | None = None,
        random_start: bool = True, norm: str = "Linf", stop_when_fooled: bool = True) -> "PGD":
    """:class:`PGD` with its arguments checked, ``alpha`` by default 2.5·ε/steps (Madry et al.'s rule)."""
    check_budget("pgd", eps, norm)
    check_at_least_one("pgd", steps=steps)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    if not alpha > 0:
        raise ValueError(f"pgd: alpha={alpha} must be > 0")
    return PGD(model, eps, alpha, steps, random_start, norm, stop_when_fooled)


class PGD(torchattacks.attack.Attack):
    """Projected Gradient Descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks"), under L∞ or L2, that keeps the first adversarial example it meets.

    From a random point of the ε-ball, ``steps`` steps of size ``alpha`` up the cross-entropy, each
    projected back into the ball and into [0, 1]. L∞: signed-gradient steps, as ``torchattacks.PGD``;
    L2: the gradient scaled to length ``alpha``, as ``torchattacks.PGDL2`` (the same random starts and
    arithmetic as theirs).

    With ``stop_when_fooled`` (the default) an image the model gets wrong is stepped no further: its
    result is that iterate, as AutoAttack's APGD keeps the first point that fools the model. torchattacks'
    PGD returns the last iterate, which the model may classify right again; so this PGD never scores an
    image robust that one of its iterates broke, and it runs only on the images still standing: on a
    network without defense most fall within a few steps. Turn it off when the model attacked is not
    the one judged (a surrogate), whose mistakes say nothing of the judge's.

    Images (N, C, H, W) in [0, 1] and labels (N,) in; adversarial images of that shape out.
    """

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, random_start: bool = True,
                 norm: str = "Linf", stop_when_fooled: bool = True) -> None:
        super().__init__("PGD", model)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.norm, self.stop_when_fooled = norm, stop_when_fooled
        self.supported_mode = ["default"]

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        images, labels = images.clone().detach().to(self.device), labels.clone().detach().to(self.device)
        adversarial = self._start(images) if self.random_start else images.clone()
        active = torch.arange(len(images), device=images.device)  # the images still being stepped
        for _ in range(self.steps):
            current = adversarial[active].requires_grad_(True)
            logits = self.get_logits(current)
            if self.stop_when_fooled:
                right = logits.argmax(dim=1) == labels[active]
                if not right.any():
                    break
                logits, current_labels, active = logits[right], labels[active][right], active[right]
            else:
                current_labels, right = labels[active], slice(None)
            # Summed, not averaged: each image's gradient does not depend on how many share its batch.
            loss = nn.functional.cross_entropy(logits, current_labels, reduction="sum")
            gradient = torch.autograd.grad(loss, current)[0][right]
            adversarial[active] = self._step(adversarial[active], gradient, images[active])
        return adversarial

    def _start(self, images: Tensor) -> Tensor:
        """A random point of the ε-ball, clipped to [0, 1]: uniform per value (L∞); a uniformly random
        length along a Gaussian direction (L2). torchattacks' draws, in its order."""
        if self.norm == "Linf":
            return (images + torch.empty_like(images).uniform_(-self.eps, self.eps)).clamp(0, 1)
        delta = torch.empty_like(images).normal_()
        length = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta *= torch.zeros_like(length).uniform_(0, 1) / length * self.eps
        return (images + delta).clamp(0, 1)

    def _step(self, adversarial: Tensor, gradient: Tensor, images: Tensor) -> Tensor:
        """One step of ``alpha`` from ``adversarial`` along ``gradient``, projected around ``images``."""
        if self.norm == "Linf":
            stepped = adversarial + self.alpha * gradient.sign()
            return (images + (stepped - images).clamp(-self.eps, self.eps)).clamp(0, 1)
        # flatten, not view: the gradient of a channels_last network comes back channels_last.
        stepped = adversarial + self.alpha * gradient / (gradient.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
        delta = stepped - images
        delta = delta * (self.eps / delta.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
        return (images + delta).clamp(0, 1)


class APGDT(torchattacks.APGDT):
    """torchattacks' APGD-T (Croce & Hein 2020: APGD on the targeted DLR loss, one run per target class)
    with its L2 step size per image, as in the paper and the official implementation.

    torchattacks 3.5's ``APGDT.attack_single_run`` steps every image of an L2 batch by ``step_size[0]``,
    the first image's step size (each image's step halves on its own schedule); its APGD, untargeted,
    steps each image by its own, and is otherwise the same code line for line but for the loss. So the
    run here is APGD's, with the targeted DLR loss toward the class the clean logits rank
    ``target_class``-th: under L∞ the very same computation as torchattacks' APGD-T
    (``tests/test_attacks.py``), under L2 the corrected one. Arguments as ``torchattacks.APGDT``'s.
    """

    loss = "dlr"  # APGD's run picks its loss by this name: the DLR loss, targeted by ``dlr_loss`` below

    def attack_single_run(self, x: Tensor, y: Tensor):
        self._targets = self.get_logits(x).sort(dim=1)[1][:, -self.target_class]
        return torchattacks.APGD.attack_single_run(self, x, y)

    def dlr_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.dlr_loss_targeted(logits, labels, self._targets)


def ensemble_member(name: str, model: nn.Module, eps: float, seed: int = 0, num_classes: int = 10,
                    norm: str = "Linf") -> torchattacks.attack.Attack:
    """One AutoAttack member with the budget of the paper's standard version (Croce & Hein 2020,
    "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks"): APGD with cross-entropy (100 steps), APGD-T with the targeted DLR loss (100 steps for
    each of the 9 other classes), FAB-T (100 steps, 9 targets) and Square (5,000 queries), with the
    official implementation's settings (:data:`FAB_SETTINGS`, :data:`SQUARE_SETTINGS`), under the
    ``norm`` of the threat model (the same budgets for L2, as the official standard version).
    torchattacks' own ``AutoAttack`` runs its members with 10 steps; these are the paper's."""
    check_budget(name, eps, norm)
    if name not in ENSEMBLE_BUDGETS:
        raise ValueError(f"unknown attack {name!r}; the ensemble's members are {', '.join(ENSEMBLE_MEMBERS)}")
    _, steps, restarts = ENSEMBLE_BUDGETS[name]
    members = {
        "apgd-ce": lambda: torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=restarts, loss="ce",
                                             seed=seed),
        "apgd-t": lambda: APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=restarts, n_classes=num_classes,
                                seed=seed),
        "fab-t": lambda: torchattacks.FAB(model, norm=norm, eps=eps, steps=steps, n_restarts=restarts,
                                          multi_targeted=True, n_classes=num_classes, seed=seed, **FAB_SETTINGS),
        "square": lambda: torchattacks.Square(model, norm=norm, eps=eps, n_queries=steps, n_restarts=restarts,
                                              seed=seed, **SQUARE_SETTINGS),
    }
    return members[name]()


def square(model: nn.Module, eps: float, queries: int, seed: int = 0) -> torchattacks.Square:
    """Square (Andriushchenko et al. 2020), AutoAttack's black-box member, with ``queries`` model passes an
    image at most: it needs no gradient, so it cross-checks the gradient attacks (``checks.py``)."""
    attack = ensemble_member("square", model, eps, seed)
    attack.n_queries = queries
    return attack


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode with frozen weights, then put back every submodule's own mode,
    each weight's ``requires_grad`` and its ``.grad``. Restoring only the top module's mode is not
    enough: a wrapper created in training mode would switch the network inside it to training."""
    modes = [(module, module.training) for module in model.modules()]
    weights = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.eval()
    for parameter, *_ in weights:
        parameter.requires_grad_(False)  # gradients for the image only: faster, and nothing accumulates
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for parameter, requires_grad, grad in weights:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad


def run_attack(attack: torchattacks.attack.Attack, images: Tensor, labels: Tensor, seed: int = 0) -> Tensor:
    """Adversarial images (N, 3, H, W) in [0, 1] for ``images`` of that shape, inside the ε-ball.

    Works inside ``torch.inference_mode()`` and ``torch.no_grad()`` too (``trainer.test`` runs
    under them): gradients are switched back on and the inputs copied into ordinary tensors,
    since inference tensors cannot take part in autograd. Random starts draw from a private
    stream seeded with ``seed``, so an attack is reproducible and moves no other number.
    """
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.inference_mode(False), torch.enable_grad(), untouched(attack.model), \
            torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        clean = images.clone()
        adversarial = attack(clean, labels.clone()).detach()
    # FAB and Square search their own way; an image outside the threat model would not count.
    return project(adversarial, clean, attack.eps, getattr(attack, "norm", "Linf"))


def project(adversarial: Tensor, clean: Tensor, eps: float, norm: str = "Linf") -> Tensor:
    """``adversarial`` (N, C, H, W) moved into the ``norm`` ball of radius ``eps`` around ``clean`` and
    into [0, 1]; images already inside are left as they are (L2: within float rounding, 1e-6 of ε)."""
    if norm == "Linf":
        return torch.min(torch.max(adversarial, clean - eps), clean + eps).clamp(0, 1)
    delta = adversarial - clean
    length = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    shortened = clean + delta * (eps / length.clamp_min(1e-12))
    return torch.where(length > eps * (1 + 1e-6), shortened, adversarial).clamp(0, 1)


class _StraightThrough(torch.autograd.Function):
    """Forward: the defense, exactly. Backward: the gradient of its differentiable approximation."""

    @staticmethod
    def forward(ctx, images: Tensor, approximation: Tensor, defense: Defense) -> Tensor:
        return defense(images.detach())

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[None, Tensor, None]:
        return None, grad_output, None


class ThroughDefense(nn.Module):
    """``model(defense(x))`` for an attacker who knows the defense: the forward pass runs the real
    defense; the backward pass takes the gradient of ``defense.approximation(x)``: exact where the
    defense is differentiable (Gaussian blur), the identity where it is not (JPEG, median, TV
    denoising, rounding to 8 bits): BPDA, Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give
    a False Sense of Security". Attacking it with any gradient attack is an adaptive attack.

    Created in eval mode, like the network it wraps. Input and output as ``model``: [0, 1] images
    (N, 3, H, W) → logits.
    """

    def __init__(self, model: nn.Module, defense: Defense) -> None:
        super().__init__()
        self.model, self.defense = model, defense
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        return self.model(_StraightThrough.apply(images, self.defense.approximation(images), self.defense))


Judge = Callable[[Tensor], Tensor]
"""Images (N, 3, H, W) in [0, 1] → predicted labels (N,): the model that decides whether an attack worked."""


def survivors(attack: Callable[[Tensor, Tensor], Tensor], judge: Judge, images: Tensor, labels: Tensor,
              standing: Tensor) -> Tensor:
    """(N,) bool: the images of ``standing`` that ``judge`` still gets right after ``attack`` (run on those only)."""
    return attack_chain({"attack": attack}, judge, images, labels, standing)[1]["attack"]


def attack_chain(attacks: dict[str, Callable[[Tensor, Tensor], Tensor]], judge: Judge, images: Tensor,
                 labels: Tensor, standing: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``attacks`` one after another, each only on the images that every earlier one failed on,
    as AutoAttack runs its members; the worst case per image.

    Args:
        attacks: name → ``attack(images, labels)`` returning adversarial images, in order.
        judge: predicts labels of (adversarial) images; an attack works when the judge errs.
        images, labels: (N, 3, H, W) in [0, 1] and (N,).
        standing: (N,) bool, the images still correctly classified before the chain starts (e.g.
            after FGSM); default: those ``judge`` gets right on ``images``.

    Returns:
        The adversarial images (for each image, the first attack's that fooled the judge, else the
        last attack's attempt) and, per attack, the (N,) bool mask of images that survived it and every
        attack before it: so each mask is a subset of the previous one.
    """
    adversarial = images.clone()
    if standing is None:
        standing = judge(images) == labels
    robust = {}
    for name, attack in attacks.items():
        standing = standing.clone()
        index = standing.nonzero().squeeze(1)
        if len(index):
            candidate = attack(images[index], labels[index])
            adversarial[index] = candidate
            standing[index[judge(candidate) != labels[index]]] = False
        robust[name] = standing
    return adversarial, robust
