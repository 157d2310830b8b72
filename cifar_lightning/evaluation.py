"""The test-time robustness study as plain functions over tensors (no Lightning).

For each test batch the attacked and defended images are made once (:class:`AttackSuite`) and
then fed to every model that is evaluated (:func:`predict`); :class:`RobustnessMetrics` keeps
torchmetrics state per input kind, so that under DDP the numbers are synced over all ranks.

Input kinds, named as in the TensorBoard tags ``test/<model>/<input>/<metric>``: on every test
image ``clean``, ``fgsm``, ``clean/<defense>``, ``fgsm/<defense>``, ``fgsm_eps<ε>`` and
``fgsm_eps<ε>/<defense>`` (the ε sweep); on the strong attacks' subset ``pgd``, the ensemble's
members (``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``), each with ``_eps<ε>`` for the sweep, and
``adaptive/<defense>``; for the int8 models ``transfer`` and ``whitebox``.
"""

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torchmetrics import Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.attacks import (
    ENSEMBLE_BUDGETS,
    Judge,
    ThroughDefense,
    attack_chain,
    ensemble_member,
    fgsm,
    pgd,
    run_attack,
)
from cifar_lightning.data import CLASSES
from cifar_lightning.defenses import Defense


class StageTimer:
    """Wall seconds per named stage, summed over batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[stage] += time.perf_counter() - start


def sweep_name(eps: float) -> str:
    return f"fgsm_eps{eps:.4f}"


class AttackSuite:
    """Makes every attacked and defended version of a batch, each exactly once: the study on every
    test image (FGSM, the ε sweep, the defenses). The strong attacks run on a subset
    (:class:`StrongAttacks`).

    Args:
        eps: FGSM budget in [0, 1] pixel space (L∞).
        defenses: image-processing defenses applied to clean and FGSM images.
        eps_sweep: extra FGSM budgets, each evaluated with and without every defense.
    """

    def __init__(self, eps: float, defenses: Sequence[Defense], eps_sweep: Sequence[float] = ()) -> None:
        self.eps, self.defenses, self.eps_sweep = eps, list(defenses), list(eps_sweep)
        self.timer = StageTimer()

    @property
    def input_names(self) -> list[str]:
        names = ["clean", "fgsm"]
        names += [f"{kind}/{d.name}" for kind in ("clean", "fgsm") for d in self.defenses]
        for eps in self.eps_sweep:
            names += [sweep_name(eps)] + [f"{sweep_name(eps)}/{d.name}" for d in self.defenses]
        return names

    def describe(self, input_name: str) -> dict[str, object]:
        """What an input kind is: its attack, budget, defense, and the attacker's knowledge."""
        kind, _, defense = input_name.partition("/")
        eps = {"clean": 0.0, "fgsm": self.eps}.get(kind)
        if eps is None:  # fgsm_eps<ε>
            eps = float(kind.removeprefix("fgsm_eps"))
        return {"attack": "none" if kind == "clean" else "FGSM", "eps": eps, "steps": 0 if kind == "clean" else 1,
                "restarts": 0 if kind == "clean" else 1, "defense": defense or "none",
                "threat": "none" if kind == "clean" else "non-adaptive"}

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """All input kinds for a batch of [0, 1] images (N, 3, H, W), by name, on their device."""
        inputs = {"clean": images}
        with self.timer("fgsm"):
            inputs["fgsm"] = run_attack(fgsm(model, self.eps), images, labels)
        for eps in self.eps_sweep:
            with self.timer("fgsm (ε sweep)"):
                inputs[sweep_name(eps)] = run_attack(fgsm(model, eps), images, labels)
        for defense in self.defenses:
            with self.timer(f"defense {defense.name}"):
                for kind in ["clean", "fgsm", *map(sweep_name, self.eps_sweep)]:
                    inputs[f"{kind}/{defense.name}"] = defense(inputs[kind])
        return inputs


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
                      judge: Judge | None = None):
    """``attack(images, labels)``: PGD from ``restarts`` random starts, each restart only on the
    images the earlier ones did not fool (judged by ``judge``, by default ``model`` itself)."""
    judge = judge or partial(predicted_labels, model)
    attacks = {f"restart {r}": partial(_pgd_from, seed + r, model, eps, steps) for r in range(restarts)}
    return lambda images, labels: attack_chain(attacks, judge, images, labels)[0]


def _pgd_from(seed: int, model: nn.Module, eps: float, steps: int, images: Tensor, labels: Tensor) -> Tensor:
    """One PGD restart, its random start drawn from ``seed``."""
    return run_attack(pgd(model, eps, steps), images, labels, seed)


class StrongAttacks:
    """The attacker the field uses, on a fixed subset of the test set (they cost 20 to 1,000 model
    passes an image): PGD with restarts, an AutoAttack-style ensemble (Croce & Hein 2020) with the
    paper's budgets, and an adaptive PGD through each defense (``attacks.ThroughDefense``).

    Each runs as a chain (``attacks.attack_chain``): first FGSM (from the per-batch study), then
    PGD, then each ensemble member, each only on the images still standing, so an image counts as
    robust only if it survives every attack up to that one, and accuracies can only fall along the
    chain. The adaptive attack on a defense starts from the images that FGSM-then-defense left.

    Args:
        eps: budget in [0, 1] pixel space (L∞); ``eps_sweep``: further budgets for the ε curve.
        defenses: the defenses to attack adaptively.
        pgd_steps, pgd_restarts: PGD's steps (step size 2.5·ε/steps) and random starts.
        ensemble: members of ``attacks.ENSEMBLE_MEMBERS`` to run after PGD, in that order.
        sweep_ensemble: run the ensemble at every ``eps_sweep`` budget too, not only PGD (at small
            budgets most images survive PGD, and APGD-T costs 900 passes an image).
        adaptive: run the adaptive PGD through each defense.
        seed: seed of every random start, so a run is reproducible.
    """

    def __init__(self, eps: float, defenses: Sequence[Defense], eps_sweep: Sequence[float] = (),
                 pgd_steps: int = 20, pgd_restarts: int = 1, ensemble: Sequence[str] = ("apgd-ce", "apgd-t"),
                 sweep_ensemble: bool = False, adaptive: bool = True, seed: int = 0) -> None:
        self.eps, self.defenses, self.eps_sweep = eps, list(defenses), list(eps_sweep)
        self.pgd_steps, self.pgd_restarts, self.ensemble = pgd_steps, pgd_restarts, list(ensemble)
        self.sweep_ensemble, self.adaptive, self.seed = sweep_ensemble, adaptive, seed

    def chain(self, eps: float) -> list[str]:
        """The attacks after FGSM at budget ``eps``."""
        return ["pgd", *self.ensemble] if eps == self.eps or self.sweep_ensemble else ["pgd"]

    def _suffix(self, eps: float) -> str:
        return "" if eps == self.eps else f"_eps{eps:.4f}"

    @property
    def input_names(self) -> list[str]:
        names = [f"{attack}{self._suffix(eps)}" for eps in [self.eps, *self.eps_sweep] for attack in self.chain(eps)]
        return names + ([f"adaptive/{d.name}" for d in self.defenses] if self.adaptive else [])

    def describe(self, input_name: str) -> dict[str, object]:
        kind, _, defense = input_name.partition("/")
        attack, _, eps = kind.partition("_eps")
        chain = ["fgsm", "pgd", *self.ensemble]
        if attack == "transfer":  # an int8 model on the FP32 model's worst-case images
            return {"attack": "FP32 worst case", "eps": self.eps, "steps": 0, "restarts": 0, "defense": "none",
                    "threat": "transfer", "worst_of": "+".join(chain)}
        if attack == "whitebox":  # PGD on the int8 model's fake-quantized surrogate
            return {"attack": "PGD", "eps": self.eps, "steps": self.pgd_steps, "restarts": self.pgd_restarts,
                    "defense": "none", "threat": "white-box (surrogate)", "worst_of": "fgsm+pgd"}
        # Square's steps are queries.
        name, steps, restarts = {"pgd": ("PGD", self.pgd_steps, self.pgd_restarts),
                                 "adaptive": ("PGD", self.pgd_steps, self.pgd_restarts), **ENSEMBLE_BUDGETS}[attack]
        return {"attack": name,
                "eps": float(eps) if eps else self.eps, "steps": steps, "restarts": restarts,
                "defense": defense or "none", "threat": "adaptive" if defense else "white-box",
                "worst_of": "fgsm+pgd" if defense else "+".join(chain[: chain.index(attack) + 1])}

    def standing(self, probabilities: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """Per image, right on the clean image and after FGSM, where each chain starts: ``fgsm``,
        ``fgsm_eps<ε>`` and, right on the defended clean and FGSM images, ``fgsm/<defense>``; and
        ``clean``, right on the clean image."""
        right = {name: p.argmax(dim=1) == labels for name, p in probabilities.items()}
        standing = {"clean": right["clean"]}
        standing |= {name: right["clean"] & right[name] for name in ["fgsm", *map(sweep_name, self.eps_sweep)]}
        return standing | {f"fgsm/{d.name}": right[f"clean/{d.name}"] & right[f"fgsm/{d.name}"] for d in self.defenses}

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, standing: dict[str, Tensor],
                 timer: StageTimer) -> tuple[dict[str, Tensor], Tensor]:
        """Robust masks (N,) bool by input name, and the adversarial images at ``eps`` (each image's
        first success along the chain, else the last attempt).

        ``standing``: per-image correctness after FGSM from the per-batch study, for ``fgsm``,
        ``fgsm_eps<ε>`` and ``fgsm/<defense>`` (correct on the clean image too).
        """
        masks, judge = {}, partial(predicted_labels, model)
        for eps in [self.eps, *self.eps_sweep]:
            attacks = {"pgd": self._timed(timer, "pgd", pgd_with_restarts(
                model, eps, self.pgd_steps, self.pgd_restarts, self.seed))}
            attacks |= {name: self._timed(timer, name, partial(
                lambda x, y, name, eps: run_attack(ensemble_member(name, model, eps, self.seed), x, y, self.seed),
                name=name, eps=eps)) for name in self.chain(eps)[1:]}
            fgsm_name = "fgsm" if eps == self.eps else sweep_name(eps)
            adversarial, robust = attack_chain(attacks, judge, images, labels, standing[fgsm_name])
            masks |= {f"{name}{self._suffix(eps)}": mask for name, mask in robust.items()}
            if eps == self.eps:
                worst = adversarial
        for defense in self.defenses if self.adaptive else []:
            defended = ThroughDefense(model, defense)
            defended_judge = lambda x, defense=defense: predicted_labels(model, defense(x))  # noqa: E731
            attack = pgd_with_restarts(defended, self.eps, self.pgd_steps, self.pgd_restarts, self.seed,
                                       judge=defended_judge)
            _, robust = attack_chain({"adaptive": self._timed(timer, f"adaptive {defense.name}", attack)},
                                     defended_judge, images, labels, standing[f"fgsm/{defense.name}"])
            masks[f"adaptive/{defense.name}"] = robust["adaptive"]
        return masks, worst

    @staticmethod
    def _timed(timer: StageTimer, stage: str, attack):
        def timed(images: Tensor, labels: Tensor) -> Tensor:
            with timer(stage):
                return attack(images, labels)
        return timed


@torch.inference_mode()
def predict(model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Softmax probabilities (N, classes) of ``model`` for each input kind, in one pass each.

    Inputs go in channels_last: faster for FP32 convolutions, neutral for int8 ones.
    """
    return {name: model(images.contiguous(memory_format=torch.channels_last)).softmax(dim=1)
            for name, images in inputs.items()}


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


def is_attack(input_name: str) -> bool:
    return not input_name.startswith("clean")


class RobustnessMetrics:
    """Accuracy for every input kind, attack success for the attacked ones, per-class accuracy
    for clean and FGSM images, and agreement with a reference model's predictions."""

    def __init__(self, input_names: Sequence[str], device: torch.device, num_classes: int = len(CLASSES)) -> None:
        self.accuracy = {n: MulticlassAccuracy(num_classes, average="micro").to(device) for n in input_names}
        self.success = {n: AttackSuccessRate().to(device) for n in input_names if is_attack(n)}
        self.per_class = {n: MulticlassAccuracy(num_classes, average=None).to(device) for n in ("clean", "fgsm")}
        self.agreement = MulticlassAccuracy(num_classes, average="micro").to(device)
        self.images = SumMetric().to(device)

    def update(self, probabilities: dict[str, Tensor], target: Tensor, reference: Tensor | None = None) -> None:
        """``reference``: another model's clean predictions, to count how often the two agree."""
        preds = {name: p.argmax(dim=1) for name, p in probabilities.items()}
        for name, metric in self.accuracy.items():
            metric.update(preds[name], target)
        for name, metric in self.success.items():
            metric.update(preds["clean"], preds[name], target)
        for name, metric in self.per_class.items():
            metric.update(preds[name], target)
        if reference is not None:
            self.agreement.update(preds["clean"], reference)
        self.images.update(len(target))

    def compute(self) -> dict:
        """Synced over ranks: ``{"acc": {input: …}, "attack_success": {input: …},
        "acc_class": {input: {class: …}}, "agreement": float | None, "images": int}``."""
        return {
            "acc": {name: m.compute().item() for name, m in self.accuracy.items()},
            "attack_success": {name: m.compute().item() for name, m in self.success.items()},
            "acc_class": {name: dict(zip(CLASSES, m.compute().tolist())) for name, m in self.per_class.items()},
            "agreement": self.agreement.compute().item() if self.agreement.update_called else None,
            "images": int(self.images.compute().item()),
        }


class RobustAccuracy:
    """Accuracy on the strong attacks' subset from per-image robust masks, and attack success (the
    share of the images right when clean, the ``clean`` mask, that an attack fools); synced over
    ranks like :class:`RobustnessMetrics`, whose ``compute`` layout it shares."""

    def __init__(self, input_names: Sequence[str], device: torch.device) -> None:
        self.robust = {name: SumMetric().to(device) for name in ["clean", *input_names]}
        self.images = SumMetric().to(device)

    def update(self, masks: dict[str, Tensor]) -> None:
        for name, metric in self.robust.items():
            metric.update(masks[name].sum())
        self.images.update(len(masks["clean"]))

    def compute(self) -> dict:
        images = int(self.images.compute().item())
        robust = {name: m.compute().item() for name, m in self.robust.items()}
        right = robust.pop("clean")
        return {"acc": {name: count / images for name, count in robust.items()},
                "attack_success": {name: 1 - count / right if right else float("nan") for name, count in robust.items()},
                "images": images, "clean_acc": right / images}
