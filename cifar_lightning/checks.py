"""Attack-failure checks: signs that an attack failed, rather than that the model is robust.

After the official AutoAttack's ``checks.py`` (Croce & Hein 2020: randomised outputs, probabilities for
logits, zero gradients, a black-box attack beating the white-box ones) and Pintor et al. 2022,
"Indicators of Attack Failure: Debugging and Improving Optimization of Adversarial Examples" (a loss
that has not converged, a misclassification unreachable at a large ε). Each check counts the images of
the strong attacks' subset that show its sign (the costly ones on the subset's first ``images``); a
count above the check's tolerance flags the rows it concerns, with the reason, in ``results.csv``
(column ``flag``), ``results.md``, the summary and TensorBoard. A flagged number is an upper bound.

Square through each defense, the black-box cross-check of the adaptive (BPDA) rows, is an attack of
``evaluation.StrongAttacks``: its breaks count in those rows, and its check is ``black_box`` too.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from cifar_lightning.attacks import pgd, run_attack, square, survivors, untouched
from cifar_lightning.evaluation import RunUnit, StrongAttacks


@dataclass(frozen=True)
class Check:
    """A check's verdict rule. ``rows``: which rows of the model a flag marks (``attacked``: every
    gradient-attack row, ``pgd``: PGD's, ``chain``: the chain's last, ``adaptive``: the defense's
    adaptive row); ``tolerance``: the share of checked images that may show the sign unflagged;
    ``reason``: the flag's text, formatted with ``found``, ``checked`` and the study's settings."""

    rows: str
    tolerance: float
    reason: str


CHECKS = {
    "randomised": Check("attacked", 0.0, "{found} of {checked} images get different outputs from two passes: a "
                        "randomised model, which gradient attacks see anew at every step. Attack its expectation "
                        "(EOT) or fix its randomness"),
    "logits": Check("attacked", 0.5, "the outputs of {found} of {checked} images are probabilities (non-negative, "
                    "summing to 1), not logits: the attacks' cross-entropy saturates. Give the study the logits"),
    "zero_gradients": Check("attacked", 0.0, "{found} of {checked} images have a zero loss gradient: gradient "
                            "attacks cannot move them (masked gradients)"),
    "convergence": Check("pgd", 0.02, "PGD with twice the steps ({double_steps}) breaks {found} of the first "
                         "{checked} images that PGD-{steps} left: its loss had not converged. Raise pgd_steps"),
    "large_eps": Check("attacked", 0.05, "PGD at 4×ε ({large_eps:.4f}) leaves {found} of the first {checked} images "
                       "right, where about none should stay: the attacks cannot reach a misclassification"),
    "black_box": Check("chain", 0.01, "Square ({queries:,} queries, no gradients) breaks {found} of the first "
                       "{checked} images that the white-box chain left: its gradients mislead"),
}
DEFENSE_BLACK_BOX = Check("adaptive", 0.01, "Square ({defense_queries:,} queries) through {defense} breaks {found} "
                          "of the first {checked} images that adaptive PGD left (counted in this row): BPDA's gradient "
                          "misleads here")


@dataclass(frozen=True)
class Flag:
    """A check that fired on ``model``: the rows it marks (input names) and why."""

    model: str
    check: str
    inputs: tuple[str, ...]
    reason: str


def check_checks(owner: str, checks: Sequence[str], images: int, square_queries: int) -> None:
    unknown = [name for name in checks if name not in CHECKS]
    if unknown:
        raise ValueError(f"{owner}: checks={list(checks)} has unknown check {unknown[0]!r}; choose from "
                         f"{', '.join(CHECKS)}")
    for name, value in (("check_images", images), ("square_queries", square_queries)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name}={value!r} must be an integer >= 1")


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(images.contiguous(memory_format=torch.channels_last)).float()


def _randomised(model: nn.Module, images: Tensor) -> Tensor:
    """Per image: two passes give outputs further apart than float rounding."""
    first, second = _logits(model, images), _logits(model, images)
    return (first - second).abs().amax(dim=1) > 1e-4 * first.abs().amax(dim=1).clamp_min(1)


def _probabilities(outputs: Tensor) -> Tensor:
    """Per image: the output row is non-negative and sums to 1."""
    return (outputs >= 0).all(dim=1) & ((outputs.sum(dim=1) - 1).abs() < 1e-3)


def _zero_gradients(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Per image: the gradient of its cross-entropy with respect to the image is exactly zero."""
    with torch.inference_mode(False), torch.enable_grad(), untouched(model):
        x = images.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), labels.clone(), reduction="sum")
        gradient = torch.autograd.grad(loss, x)[0]
    return gradient.flatten(1).abs().amax(dim=1) == 0


class AttackChecks:
    """The checks of :data:`CHECKS` on one part of the subset at a time (their counts: :class:`CheckCounts`;
    the verdict: :func:`flags`).

    Args:
        checks: the checks to run, by name (all by default).
        images: how many of the subset's first images the costly checks (``convergence``, ``large_eps``,
            ``black_box``) run on.
        square_queries: Square's queries (``black_box``; 5,000 in AutoAttack).
    """

    def __init__(self, checks: Sequence[str] = tuple(CHECKS), images: int = 100, square_queries: int = 5000) -> None:
        check_checks("AttackChecks", checks, images, square_queries)
        self.checks, self.images, self.square_queries = list(checks), images, square_queries

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, robust: dict[str, Tensor], sliced: Tensor,
                 strong: StrongAttacks, run_unit: RunUnit) -> dict[str, tuple[Tensor, Tensor]]:
        """Per check: (images showing its sign, images checked), (N,) bool each.

        ``robust``: the part's masks by input name (``StrongAttacks``); ``sliced``: the part's images among
        the subset's first ``images``; ``strong``: the ``StrongAttacks`` that made ``robust``."""
        everyone = torch.ones_like(labels, dtype=torch.bool)
        judge = lambda x: _logits(model, x).argmax(dim=1)
        found = {}
        for name in self.checks:
            unit = lambda compute, name=name: run_unit(f"check {name}", f"check.{name}", compute)
            if name == "randomised":
                found[name] = unit(lambda: _randomised(model, images)), everyone
            elif name == "logits":
                found[name] = unit(lambda: _probabilities(_logits(model, images))), everyone
            elif name == "zero_gradients":
                found[name] = unit(lambda: _zero_gradients(model, images, labels)), everyone
            elif name == "convergence":
                pgd_kind = strong.chain(strong.eps)[0]
                left = robust[pgd_kind.name] & sliced
                attack = lambda x, y: run_attack(pgd(model, strong.eps, 2 * strong.pgd_steps), x, y, strong.seed)
                found[name] = unit(lambda: left & ~survivors(attack, judge, images, labels, left)), sliced
            elif name == "large_eps":
                eps = min(4 * strong.eps, 1.0)
                attack = lambda x, y: run_attack(pgd(model, eps, strong.pgd_steps), x, y, strong.seed)
                found[name] = unit(lambda: survivors(attack, judge, images, labels, sliced)), sliced
            elif name == "black_box":
                left = robust[strong.chain(strong.eps)[-1].name] & sliced
                black_box = square(model, strong.eps, self.square_queries, strong.seed)
                attack = lambda x, y: run_attack(black_box, x, y, strong.seed)
                found[name] = unit(lambda: left & ~survivors(attack, judge, images, labels, left)), sliced
        return found

    def settings(self, strong: StrongAttacks) -> dict[str, object]:
        """What the reasons' texts quote: each number from the attack that used it."""
        return {"steps": strong.pgd_steps, "double_steps": 2 * strong.pgd_steps, "large_eps": min(4 * strong.eps, 1.0),
                "queries": self.square_queries, "defense_queries": strong.defense_square}

    def flags(self, model: str, counts: dict[str, tuple[int, int]], strong: StrongAttacks) -> list[Flag]:
        """The checks that fired on ``model`` (``counts``: :meth:`CheckCounts.compute`), each marking the rows
        of ``strong`` its :class:`Check` ``rows`` names."""
        chain = strong.chain(strong.eps)
        rows = {"attacked": [kind.name for kind in strong.kinds], "pgd": [chain[0].name], "chain": [chain[-1].name]}
        rows |= {f"adaptive/{d.name}": [strong.adaptive_kind(d).name] for d in strong.defenses}
        return flags(model, counts, rows, self.settings(strong))


class CheckCounts:
    """Images showing each check's sign, and images checked, summed over parts (and ranks, as torchmetrics)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.found, self.checked = device, {}, {}

    def update(self, evidence: dict[str, tuple[Tensor, Tensor]]) -> None:
        for name, (found, checked) in evidence.items():
            for counts, mask in ((self.found, found), (self.checked, checked)):
                counts.setdefault(name, SumMetric().to(self.device)).update(mask.sum().to(self.device))

    def compute(self) -> dict[str, tuple[int, int]]:
        return {name: (int(self.found[name].compute()), int(self.checked[name].compute())) for name in self.found}


def flags(model: str, counts: dict[str, tuple[int, int]], rows: dict[str, list[str]],
          settings: dict[str, object]) -> list[Flag]:
    """The checks that fired: those whose share of images showing the sign is above the tolerance.

    ``counts``: check (``black_box/<defense>`` for Square through a defense) → (found, checked);
    ``rows``: :class:`Check` ``rows`` value (``adaptive/<defense>`` for a defense) → the input names it marks."""
    fired = []
    for name, (found, checked) in counts.items():
        check, _, defense = name.partition("/")
        rule = DEFENSE_BLACK_BOX if defense else CHECKS[check]
        if checked and found / checked > rule.tolerance:
            marked = rows.get(f"adaptive/{defense}" if defense else rule.rows, [])
            reason = rule.reason.format(found=found, checked=checked, defense=defense, **settings)
            fired.append(Flag(model, name, tuple(marked), f"{name}: {reason}"))
    return fired
