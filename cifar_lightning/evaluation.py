"""The test-time robustness study's parts as plain functions over tensors (no Lightning).

For each test batch the attacked and defended images are made once (:class:`AttackSuite`) and
then fed to every model under test (:func:`predict`); :class:`RobustnessMetrics` keeps
torchmetrics state per input kind, so that under DDP the numbers are synced over all ranks. The
strong attacks run on a subset (:class:`StrongAttacks`). ``study.Study`` puts the parts together.

An input kind is a value (:class:`InputKind`): what made the images (attack, ε, steps, restarts),
the defense in front of the model, and the attacker's knowledge (threat). Its name — ``clean``,
``fgsm``, ``clean/<defense>``, ``fgsm/<defense>``, ``fgsm_eps<ε>[/<defense>]`` (the ε sweep),
``pgd``, the ensemble's members (``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``) with ``_eps<ε>``
in the sweep, AutoAttack's standard version (``autoattack.apgd-ce`` … ``autoattack.square``),
``adaptive/<defense>``, and for models without gradients ``transfer`` and ``whitebox``; under the L2
threat model ``l2.`` before the attack's name (``l2.fgm``, ``l2.pgd``, ``l2.apgd-ce``, …); the common
corruptions ``corruption.<name>_s<severity>`` and ``corruption.clean`` (their images, uncorrupted) — is
derived from it for tables and tags, and never parsed back.
"""

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor, nn
from torchmetrics import Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.attacks import (
    AUTOATTACK_VERSIONS,
    ENSEMBLE_BUDGETS,
    FGM,
    Judge,
    ThroughDefense,
    attack_chain,
    check_at_least_one,
    ensemble_member,
    fgsm_at_budgets,
    pgd,
    run_attack,
    square,
    survivors,
)
from cifar_lightning.corruptions import CORRUPTIONS, SEVERITIES, check_corruption, corrupt
from cifar_lightning.data import CLASSES
from cifar_lightning.defenses import Defense

# Names of the attacks in the tables; the ensemble's members as in ``attacks.ENSEMBLE_BUDGETS``.
ATTACK_TITLES = {"none": "none", "fgsm": "FGSM", "fgm": "FGM", "pgd": "PGD", "transfer": "FP32 worst case"} | {
    member: title for member, (title, _, _) in ENSEMBLE_BUDGETS.items()}


# Threats whose rows are named after the threat rather than the attack.
_NAMED_BY_THREAT = {"adaptive": "adaptive", "transfer": "transfer", "white-box (surrogate)": "whitebox"}


@dataclass(frozen=True)
class InputKind:
    """One kind of input a model is scored on.

    Args:
        attack: what made the images: ``none`` (clean), ``fgsm``, ``fgm`` (its L2 form), ``pgd``, an
            ensemble member, or ``transfer`` (another model's worst case along the chain ``worst_of``).
        eps: the budget in [0, 1] pixel space, in the ``norm``, exactly as configured; 0 for clean images.
        steps, restarts: the attack's steps (Square: queries) and random starts.
        defense: the defense's name (``defenses.Defense.name``) in front of the model, or None.
        threat: ``none``, ``non-adaptive`` (crafted without the defense), ``white-box``,
            ``adaptive`` (through the defense), ``transfer``, ``white-box (surrogate)``.
        sweep: a budget of the ε sweep rather than the study's main ε (it names the kind ``…_eps<ε>``).
        worst_of: the attacks an image had to survive to count as robust (the strong attacks' chains).
        autoattack: the AutoAttack version (``attacks.AUTOATTACK_VERSIONS``) whose member this is; its
            rows are named ``autoattack.<member>``, apart from the project's own chain.
        norm: the threat model ε bounds (``attacks.NORMS``): ``Linf`` or ``L2`` (rows ``l2.<attack>``).
        corruption, severity: the common corruption (``corruptions.CORRUPTIONS``, or ``none`` for its
            images uncorrupted) and its severity (1–5) of a ``threat="corruption"`` row.
    """

    attack: str = "none"
    eps: float = 0.0
    steps: int = 0
    restarts: int = 0
    defense: str | None = None
    threat: str = "none"
    sweep: bool = False
    worst_of: tuple[str, ...] = ()
    autoattack: str | None = None
    norm: str = "Linf"
    corruption: str | None = None
    severity: int = 0

    @property
    def name(self) -> str:
        if self.autoattack:
            return f"autoattack.{self.attack}"
        if self.corruption:
            return "corruption.clean" if self.corruption == "none" else f"corruption.{self.corruption}_s{self.severity}"
        base = _NAMED_BY_THREAT.get(self.threat) or ("clean" if self.attack == "none" else self.attack)
        prefix = "l2." if self.norm == "L2" else ""
        suffix = f"_eps{self.eps:.4f}" if self.sweep else ""
        return f"{prefix}{base}{suffix}" + (f"/{self.defense}" if self.defense else "")

    @property
    def attacked(self) -> bool:
        return self.attack != "none"

    def row(self) -> dict[str, object]:
        """The columns of a ``results.csv`` row that say what the row measures."""
        return {"input": self.name, "attack": ATTACK_TITLES[self.attack], "norm": self.norm if self.attacked else "none",
                "eps": self.eps, "steps": self.steps,
                "restarts": self.restarts, "defense": self.defense or "none", "threat": self.threat,
                "corruption": self.corruption or "none", "severity": self.severity}

    def defended(self, defense: Defense) -> "InputKind":
        return replace(self, defense=defense.name)


CLEAN = InputKind()


@dataclass
class ModelUnderTest:
    """A model the study scores.

    Args:
        name: its name in tables and tags (``fp32``, ``int8_dynamic``, …).
        model: [0, 1] images (N, 3, 32, 32) → logits (N, 10), in eval mode.
        device: where it runs; its inputs are moved there.
        gradients: a gradient attack can run on it (white-box); without, it is scored on the first
            model's worst-case images (transfer) and, given a ``surrogate``, by PGD on that.
        surrogate: a differentiable stand-in with the same predictions (e.g. a fake-quantized copy).
        sweep: score it on the ε sweep too (the int8 copies leave it out: it stays an FP32 study).
        joint: a module returning ``(first model's logits, this model's)`` of the same images in one
            pass (``frozen.joint_pass``), which the study runs in place of both where both score an image.
    """

    name: str
    model: nn.Module
    device: torch.device
    gradients: bool = True
    surrogate: nn.Module | None = None
    sweep: bool = True
    joint: nn.Module | None = None


def fgsm_kind(eps: float, sweep: bool = False) -> InputKind:
    return InputKind("fgsm", eps, steps=1, restarts=1, threat="non-adaptive", sweep=sweep)


class StageTimer:
    """Wall seconds per named stage, summed over batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[stage] += time.perf_counter() - start


class AttackSuite:
    """Makes every attacked and defended version of a batch, each exactly once: FGSM and the defenses
    on every test image, the ε sweep on every image or on the strong attacks' subset alone
    (``sweep_on_subset``). The strong attacks run on that subset (:class:`StrongAttacks`).

    Args:
        eps: FGSM budget in [0, 1] pixel space (L∞).
        defenses: image-processing defenses applied to clean and FGSM images.
        eps_sweep: extra FGSM budgets, each evaluated with and without every defense.
        sweep_on_subset: make the sweep's images (FGSM at each budget, and each defense of them) for the
            subset's images alone, where PGD's sweep runs: the sweep is most of a study's model passes.
    """

    def __init__(self, eps: float, defenses: Sequence[Defense], eps_sweep: Sequence[float] = (),
                 sweep_on_subset: bool = False) -> None:
        self.eps, self.defenses, self.eps_sweep = eps, list(defenses), list(eps_sweep)
        self.sweep_on_subset = sweep_on_subset

    @property
    def attacked_kinds(self) -> list[InputKind]:
        """FGSM at the main ε, then at each budget of the sweep."""
        return [fgsm_kind(self.eps)] + [fgsm_kind(eps, sweep=True) for eps in self.eps_sweep]

    @property
    def kinds(self) -> list[InputKind]:
        """Every input kind of a batch, in the tables' order."""
        main, *sweep = self.attacked_kinds
        kinds = [CLEAN, main] + [kind.defended(d) for kind in (CLEAN, main) for d in self.defenses]
        for kind in sweep:
            kinds += [kind] + [kind.defended(d) for d in self.defenses]
        return kinds

    def on_subset(self, kind: InputKind) -> bool:
        """Whether ``kind``'s images are made, and scored, for the subset's images of a batch alone."""
        return kind.sweep and self.sweep_on_subset

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, timer: StageTimer,
                 subset: Tensor) -> dict[str, Tensor]:
        """All input kinds for a batch of [0, 1] images (N, 3, H, W), by name, on their device: (N, 3, H, W)
        each, or (M, 3, H, W) for a kind :meth:`on_subset`, the images at the batch positions ``subset`` (M,)."""
        inputs = {CLEAN.name: images}
        with timer("fgsm"):  # one gradient for every budget, so the whole batch's
            attacked = fgsm_at_budgets(model, images, labels, [kind.eps for kind in self.attacked_kinds])
        inputs |= {kind.name: adversarial[subset] if self.on_subset(kind) else adversarial
                   for kind, adversarial in zip(self.attacked_kinds, attacked)}
        for defense in self.defenses:
            with timer(f"defense {defense.name}"):
                for kind in [CLEAN, *self.attacked_kinds]:
                    inputs[kind.defended(defense).name] = defense(inputs[kind.name])
        return inputs

    def standing(self, probabilities: dict[str, Tensor], labels: Tensor, subset: Tensor) -> dict[str, Tensor]:
        """Per image of the subset (the batch positions ``subset``), where the strong attacks' chains start,
        by input name: right on the clean image (``clean``); right on it and after FGSM at each budget
        (``fgsm``, ``fgsm_eps<ε>``); right on the defended clean and FGSM images (``fgsm/<defense>``). Only
        the kinds in ``probabilities``, each (N, classes), or (M, classes) for a kind :meth:`on_subset`."""
        kinds = {kind.name: kind for kind in self.kinds}
        right = {name: p.argmax(dim=1) == labels[subset] if self.on_subset(kinds[name]) else
                 (p.argmax(dim=1) == labels)[subset] for name, p in probabilities.items()}
        standing = {CLEAN.name: right[CLEAN.name]}
        standing |= {k.name: right[CLEAN.name] & right[k.name] for k in self.attacked_kinds if k.name in right}
        main = fgsm_kind(self.eps)
        return standing | {main.defended(d).name: right[CLEAN.defended(d).name] & right[main.defended(d).name]
                           for d in self.defenses}


class CorruptionSuite:
    """The common corruptions (Hendrycks & Dietterich 2019; CIFAR-10-C's parameters, ``corruptions.py``)
    on a seeded, class-stratified subset of the test set: each corruption at each severity, made once
    per image and scored on every model under test, beside the same images uncorrupted.

    Args:
        corruptions: names from ``corruptions.CORRUPTIONS`` (all 15 by default), in the tables' order.
        severities: from 1 to 5 (all by default).
        images: the subset's size (None: every test image).
        seed: seed of the subset and of the corruptions' random draws (per image, so the same in any batch).
        owner: the name a bad value's error starts with (the callback's, when it builds the suite).
    """

    def __init__(self, corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                 images: int | None = 1000, seed: int = 0, owner: str = "CorruptionSuite") -> None:
        if images is not None:
            check_at_least_one(owner, images=images)
        for field, values in (("corruptions", corruptions), ("severities", severities)):
            if not values:
                raise ValueError(f"{owner}: {field}=[] leaves nothing to run; remove the callback to skip corruptions")
        try:
            for name in corruptions:
                for severity in severities:
                    check_corruption(name, severity)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
        self.corruptions, self.severities, self.images, self.seed = list(corruptions), list(severities), images, seed

    @property
    def kinds(self) -> list[InputKind]:
        """``corruption.clean`` (the subset uncorrupted), then each corruption at each severity."""
        return [InputKind(threat="corruption", corruption="none")] + [
            InputKind(threat="corruption", corruption=name, severity=severity)
            for name in self.corruptions for severity in self.severities]

    def __call__(self, kind: InputKind, images: Tensor, indices: Tensor) -> Tensor:
        """``kind``'s corrupted images of the [0, 1] ``images`` (N, 3, H, W), whose test-set ``indices`` (N,)
        seed them; ``corruption.clean``'s are the test batches' own."""
        return corrupt(images, kind.corruption, kind.severity, self.seed, indices)


def mean_corruption_error(accuracy: dict[InputKind, float], baseline: dict[InputKind, float],
                          relative: bool = False) -> float:
    """Hendrycks & Dietterich 2019's mCE of a model against a ``baseline`` model, from the accuracies of
    each on the same ``CorruptionSuite`` kinds: per corruption the errors summed over the severities,
    divided by the baseline's, averaged over the corruptions (1.0: as the baseline; lower is better).
    ``relative``: each error minus the model's own clean error (``corruption.clean``), the relative mCE,
    which asks how much a model degrades rather than how many it gets wrong."""
    def errors(of: dict[InputKind, float], name: str) -> float:
        clean = 1 - next(a for k, a in of.items() if k.corruption == "none") if relative else 0.0
        return sum(1 - a - clean for k, a in of.items() if k.corruption == name)

    names = dict.fromkeys(k.corruption for k in accuracy if k.corruption not in (None, "none"))
    ratios = [errors(accuracy, name) / errors(baseline, name) for name in names if errors(baseline, name) > 0]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def stratified_subset(labels: Tensor, size: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of ``size`` images (all for None), as nearly the same number of each class as
    the labels allow, drawn with a seeded generator: the same subset for the same labels and seed."""
    if size is None or size >= len(labels):
        return torch.arange(len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class = [order[labels[order] == c] for c in labels.unique()]
    chosen, quota = [], size
    # Classes in turn, one image each round, until the quota is filled: equal shares where possible.
    for rank in range(max(map(len, by_class))):
        for members in by_class:
            if quota and rank < len(members):
                chosen.append(members[rank])
                quota -= 1
    return torch.stack(chosen).sort().values


def predicted_labels(model: nn.Module, images: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(images.contiguous(memory_format=torch.channels_last)).argmax(dim=1)


def pgd_with_restarts(model: nn.Module, eps: float, steps: int, restarts: int, seed: int = 0,
                      judge: Judge | None = None, norm: str = "Linf", surrogate: bool = False):
    """``attack(images, labels)``: PGD under ``norm`` from ``restarts`` random starts, each restart only on
    the images the earlier ones did not fool (judged by ``judge``, by default ``model`` itself). Each image
    keeps the first iterate ``model`` gets wrong (``attacks.PGD``), unless ``model`` is a ``surrogate`` of
    the judge: then it is stepped to the end, since fooling the surrogate need not fool the judge."""
    judge = judge or partial(predicted_labels, model)
    attack = pgd(model, eps, steps, norm=norm, stop_when_fooled=not surrogate)
    restarts = {f"restart {r}": partial(run_attack, attack, seed=seed + r) for r in range(restarts)}
    return lambda images, labels: attack_chain(restarts, judge, images, labels)[0]


RunUnit = Callable[[str, str, Callable[[], Tensor]], Tensor]
"""Runs one unit of work, ``(stage, name, compute) → compute()``: ``Study`` times it under ``stage``
and journals it under ``name`` (``journal.Journal``), so a resumed study reads it back."""


def as_unit(run_unit: RunUnit, stage: str, name: str, attack):
    """``attack(images, labels)`` as one unit of work."""
    return lambda images, labels: run_unit(stage, name, lambda: attack(images, labels))


class StrongAttacks:
    """The attacker the field uses, on a fixed subset of the test set (they cost 20 to 1,000 model
    passes an image): PGD with restarts, an AutoAttack-style ensemble (Croce & Hein 2020) with the
    paper's budgets, and an adaptive PGD through each defense (``attacks.ThroughDefense``).

    Each runs as a chain (``attacks.attack_chain``): first FGSM (from the per-batch study), then
    PGD, then each ensemble member, each only on the images still standing, so an image counts as
    robust only if it survives every attack up to that one, and accuracies can only fall along the
    chain. The adaptive attack on a defense starts from the images that FGSM-then-defense left.
    AutoAttack as published (``autoattack``) runs as its own chain from the clean images, as the
    official implementation does: its number is comparable with the paper's and RobustBench's.
    A model without gradients is scored on another model's worst-case images (``transfer``) and,
    given a differentiable surrogate, by PGD on that surrogate (``whitebox``).

    Args:
        eps: budget in [0, 1] pixel space (L∞); ``eps_sweep``: further budgets for the ε curve.
        defenses: the defenses to attack adaptively.
        pgd_steps, pgd_restarts: PGD's steps (step size 2.5·ε/steps) and random starts.
        ensemble: members of ``attacks.ENSEMBLE_MEMBERS`` to run after PGD, in that order.
        sweep_ensemble: run the ensemble at every ``eps_sweep`` budget too, not only PGD (at small
            budgets most images survive PGD, and APGD-T costs 900 passes an image).
        adaptive: run the adaptive PGD through each defense.
        seed: seed of every random start, so a run is reproducible.
        autoattack: an AutoAttack version (``attacks.AUTOATTACK_VERSIONS``: ``standard``) to run at ``eps``
            beside the chain, or None.
        defense_square: Square's queries through each defense after the adaptive PGD, on the images the
            caller marks (``sliced``), the black-box cross-check of BPDA: the adaptive row is then the
            worst of both per image. None: not run.
        l2_eps: the L2 threat model's budget (RobustBench's: 0.5), or None for L∞ only: the chain again
            under L2 from the clean images, FGM (FGSM's L2 form) first, then PGD-L2 and the ensemble.
    """

    def __init__(self, eps: float, defenses: Sequence[Defense], eps_sweep: Sequence[float] = (),
                 pgd_steps: int = 20, pgd_restarts: int = 1, ensemble: Sequence[str] = ("apgd-ce", "apgd-t"),
                 sweep_ensemble: bool = False, adaptive: bool = True, seed: int = 0,
                 autoattack: str | None = None, defense_square: int | None = None,
                 l2_eps: float | None = None) -> None:
        self.eps, self.defenses, self.eps_sweep = eps, list(defenses), list(eps_sweep)
        self.pgd_steps, self.pgd_restarts, self.ensemble = pgd_steps, pgd_restarts, list(ensemble)
        self.sweep_ensemble, self.adaptive, self.seed = sweep_ensemble, adaptive, seed
        self.autoattack, self.defense_square, self.l2_eps = autoattack, defense_square, l2_eps

    def chain(self, eps: float) -> list[InputKind]:
        """The attacks after FGSM at budget ``eps``, each with the chain an image had to survive."""
        sweep = eps != self.eps
        members = ["pgd", *self.ensemble] if not sweep or self.sweep_ensemble else ["pgd"]
        budgets = {"pgd": (self.pgd_steps, self.pgd_restarts)} | {m: ENSEMBLE_BUDGETS[m][1:] for m in self.ensemble}
        return [InputKind(member, eps, *budgets[member], threat="white-box", sweep=sweep,
                          worst_of=("fgsm", *members[: i + 1])) for i, member in enumerate(members)]

    def l2_chain(self) -> list[InputKind]:
        """The chain under L2 at ``l2_eps`` (none without it): FGM, PGD-L2, the ensemble, from the clean images."""
        if self.l2_eps is None:
            return []
        members = ["fgm", "pgd", *self.ensemble]
        budgets = {"fgm": (1, 1), "pgd": (self.pgd_steps, self.pgd_restarts)} | {
            m: ENSEMBLE_BUDGETS[m][1:] for m in self.ensemble}
        return [InputKind(member, self.l2_eps, *budgets[member], threat="white-box", worst_of=tuple(members[: i + 1]),
                          norm="L2") for i, member in enumerate(members)]

    def autoattack_chain(self) -> list[InputKind]:
        """AutoAttack's members at ``eps`` (none without ``autoattack``), each with the chain before it."""
        members = AUTOATTACK_VERSIONS[self.autoattack] if self.autoattack else ()
        return [InputKind(member, self.eps, *ENSEMBLE_BUDGETS[member][1:], threat="white-box",
                          worst_of=members[: i + 1], autoattack=self.autoattack) for i, member in enumerate(members)]

    def adaptive_kind(self, defense: Defense) -> InputKind:
        return InputKind("pgd", self.eps, self.pgd_steps, self.pgd_restarts, defense.name, "adaptive",
                         worst_of=("fgsm", "pgd", "square") if self.defense_square else ("fgsm", "pgd"))

    @property
    def kinds(self) -> list[InputKind]:
        """The rows of a model with gradients, in the tables' order."""
        kinds = self.chain(self.eps) + self.autoattack_chain()
        kinds += [kind for eps in self.eps_sweep for kind in self.chain(eps)] + self.l2_chain()
        return kinds + ([self.adaptive_kind(d) for d in self.defenses] if self.adaptive else [])

    def without_gradients_kinds(self, surrogate: bool) -> list[InputKind]:
        """The rows of a model without gradients: the worst case of the white-box chain at ``eps``,
        transferred, and PGD on its surrogate when it has one."""
        transfer = InputKind("transfer", self.eps, threat="transfer", worst_of=self.chain(self.eps)[-1].worst_of)
        whitebox = InputKind("pgd", self.eps, self.pgd_steps, self.pgd_restarts, threat="white-box (surrogate)",
                             worst_of=("fgsm", "pgd"))
        return [transfer, whitebox] if surrogate else [transfer]

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, standing: dict[str, Tensor],
                 run_unit: RunUnit, sliced: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, dict]:
        """Robust masks (N,) bool by input name; the adversarial images at ``eps`` (each image's first
        success along the chain, else the last attempt); and per defense ``black_box/<defense>``, the
        images Square broke through it that adaptive PGD left, with the images it ran on
        (``checks.CheckCounts``' evidence).

        ``standing``: per-image correctness after FGSM from the per-batch study
        (``AttackSuite.standing``). ``run_unit`` runs each attack member (named by its input kind).
        ``sliced``: the images Square runs on through the defenses (``defense_square``; default all).
        """
        masks, evidence, judge = {}, {}, partial(predicted_labels, model)
        for eps in [self.eps, *self.eps_sweep]:
            attacks = {kind.name: as_unit(run_unit, kind.attack, kind.name, self._attack(model, kind))
                       for kind in self.chain(eps)}
            adversarial, robust = attack_chain(attacks, judge, images, labels, standing[fgsm_kind(eps, eps != self.eps).name])
            masks |= robust
            if eps == self.eps:
                worst = adversarial
        for stage, chain in [("autoattack {}", self.autoattack_chain()), ("{} (L2)", self.l2_chain())]:
            attacks = {kind.name: as_unit(run_unit, stage.format(kind.attack), kind.name, self._attack(model, kind))
                       for kind in chain}
            masks |= attack_chain(attacks, judge, images, labels, standing[CLEAN.name])[1]
        for defense in self.defenses if self.adaptive else []:
            defended = ThroughDefense(model, defense)
            defended_judge = lambda x, defense=defense: predicted_labels(model, defense(x))
            attack = pgd_with_restarts(defended, self.eps, self.pgd_steps, self.pgd_restarts, self.seed,
                                       judge=defended_judge)
            kind = self.adaptive_kind(defense)
            _, robust = attack_chain({kind.name: as_unit(run_unit, f"adaptive {defense.name}", kind.name, attack)},
                                     defended_judge, images, labels, standing[fgsm_kind(self.eps).defended(defense).name])
            masks |= robust
            if self.defense_square:
                checked = torch.ones_like(labels, dtype=torch.bool) if sliced is None else sliced
                left = robust[kind.name] & checked
                black_box = square(defended, self.eps, self.defense_square, self.seed)
                name = f"black_box/{defense.name}"
                attack = as_unit(run_unit, f"square {defense.name}", name,
                                 lambda x, y, black_box=black_box: run_attack(black_box, x, y, self.seed))
                broken = left & ~survivors(attack, defended_judge, images, labels, left)
                masks[kind.name] = robust[kind.name] & ~broken
                evidence[name] = broken, checked
        return masks, worst, evidence

    def _attack(self, model: nn.Module, kind: InputKind):
        """``attack(images, labels)`` of a white-box ``kind``: FGM, PGD with restarts or an ensemble member."""
        if kind.attack == "pgd":
            return pgd_with_restarts(model, kind.eps, self.pgd_steps, self.pgd_restarts, self.seed, norm=kind.norm)
        member = FGM(model, kind.eps) if kind.attack == "fgm" else \
            ensemble_member(kind.attack, model, kind.eps, self.seed, norm=kind.norm)
        return lambda images, labels: run_attack(member, images, labels, self.seed)


class AttackSuccessRate(Metric):
    """Share of the images classified correctly when clean that are misclassified under attack."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("flipped", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, clean_preds: Tensor, attacked_preds: Tensor, target: Tensor) -> None:
        correct = clean_preds == target
        self.correct += correct.sum()
        self.flipped += (correct & (attacked_preds != target)).sum()

    def compute(self) -> Tensor:
        return self.flipped / self.correct if self.correct else torch.tensor(float("nan"))


class RobustnessMetrics:
    """Accuracy for every input kind, attack success for the attacked ones, per-class accuracy
    for clean and FGSM images, and agreement with a reference model's predictions.

    ``on_subset``: the kinds scored on the subset's images alone (``AttackSuite.on_subset``)."""

    def __init__(self, kinds: Sequence[InputKind], device: torch.device, num_classes: int = len(CLASSES),
                 on_subset: Sequence[str] = ()) -> None:
        accuracy = lambda: MulticlassAccuracy(num_classes, average="micro").to(device)
        self.accuracy = {k.name: accuracy() for k in kinds}
        self.success = {k.name: AttackSuccessRate().to(device) for k in kinds if k.attacked}
        per_class = [k.name for k in kinds if not (k.defense or k.sweep or k.corruption)]  # clean and FGSM at the main ε
        self.per_class = {n: MulticlassAccuracy(num_classes, average=None).to(device) for n in per_class}
        self.agreement = accuracy()
        self.on_subset = set(on_subset)
        self.images, self.subset_images = SumMetric().to(device), SumMetric().to(device)

    def update(self, preds: dict[str, Tensor], target: Tensor, reference: Tensor | None = None,
               subset: Tensor | None = None) -> None:
        """Predicted labels (N,) by input kind, (M,) for a kind on the subset, whose images are at the
        positions ``subset`` (M,) of the batch; ``reference``: another model's clean predictions, to
        count how often the two agree."""
        def scored(values: Tensor, name: str) -> Tensor:  # a kind's share of the batch's `values`
            return values[subset] if name in self.on_subset else values

        for name, metric in self.accuracy.items():
            if len(preds[name]):  # a batch with none of the subset's images has nothing to score there
                metric.update(preds[name], scored(target, name))
        for name, metric in self.success.items():
            metric.update(scored(preds[CLEAN.name], name), preds[name], scored(target, name))
        for name, metric in self.per_class.items():
            metric.update(preds[name], target)
        if reference is not None:
            self.agreement.update(preds[CLEAN.name], reference)
        self.images.update(len(target))
        self.subset_images.update(len(subset) if subset is not None else 0)

    def compute(self) -> dict:
        """Synced over ranks: ``{"acc": {input: …}, "attack_success": {input: …},
        "acc_class": {input: {class: …}}, "agreement": float | None, "images": {input: int}}``."""
        images, subset_images = int(self.images.compute().item()), int(self.subset_images.compute().item())
        return {
            "acc": {name: m.compute().item() for name, m in self.accuracy.items()},
            "attack_success": {name: m.compute().item() for name, m in self.success.items()},
            "acc_class": {name: dict(zip(CLASSES, m.compute().tolist())) for name, m in self.per_class.items()},
            "agreement": self.agreement.compute().item() if self.agreement.update_called else None,
            "images": {name: subset_images if name in self.on_subset else images for name in self.accuracy},
        }


class RobustAccuracy:
    """Accuracy on the strong attacks' subset from per-image robust masks, and attack success (the
    share of the images right when clean, the ``clean`` mask, that an attack fools); synced over
    ranks like :class:`RobustnessMetrics`, whose ``compute`` layout it shares."""

    def __init__(self, kinds: Sequence[InputKind], device: torch.device) -> None:
        self.robust = {name: SumMetric().to(device) for name in [CLEAN.name, *(k.name for k in kinds)]}
        self.images = SumMetric().to(device)

    def update(self, masks: dict[str, Tensor]) -> None:
        for name, metric in self.robust.items():
            metric.update(masks[name].sum())
        self.images.update(len(masks[CLEAN.name]))

    def compute(self) -> dict:
        images = int(self.images.compute().item())
        robust = {name: m.compute().item() for name, m in self.robust.items()}
        right = robust.pop(CLEAN.name)
        return {"acc": {name: count / images for name, count in robust.items()},
                "attack_success": {name: 1 - count / right if right else float("nan") for name, count in robust.items()},
                "images": dict.fromkeys(robust, images), "clean_acc": right / images}
