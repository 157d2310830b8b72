"""The test-time robustness study as plain functions over tensors (no Lightning).

For each test batch the attacked and defended images are made once (:class:`AttackSuite`) and
then fed to every model that is evaluated (:func:`predict`); :class:`RobustnessMetrics` keeps
torchmetrics state per input kind, so that under DDP the numbers are synced over all ranks.

Input kinds, named as in the TensorBoard tags ``test/<model>/<input>/<metric>``:
``clean``, ``fgsm``, ``clean/<defense>``, ``fgsm/<defense>``, ``fgsm_eps<ε>`` and
``fgsm_eps<ε>/<defense>`` (the ε sweep), ``pgd``, ``bpda/<defense>``.
"""

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchmetrics import Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.attacks import BPDA, fgsm, pgd, run_attack
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
    """Makes every attacked and defended version of a batch, each exactly once.

    Args:
        eps: FGSM budget in [0, 1] pixel space (L∞).
        defenses: image-processing defenses applied to clean and FGSM images.
        eps_sweep: extra FGSM budgets, each evaluated with and without every defense.
        pgd_steps: steps of a PGD reference attack at ``eps`` (0: off).
        bpda: adaptive FGSM on each defense (the defense in the forward pass, identity gradient).
    """

    def __init__(
        self,
        eps: float,
        defenses: Sequence[Defense],
        eps_sweep: Sequence[float] = (),
        pgd_steps: int = 0,
        bpda: bool = False,
    ) -> None:
        self.eps, self.defenses, self.eps_sweep = eps, list(defenses), list(eps_sweep)
        self.pgd_steps, self.bpda = pgd_steps, bpda
        self.timer = StageTimer()

    @property
    def input_names(self) -> list[str]:
        names = ["clean", "fgsm"]
        names += [f"{kind}/{d.name}" for kind in ("clean", "fgsm") for d in self.defenses]
        for eps in self.eps_sweep:
            names += [sweep_name(eps)] + [f"{sweep_name(eps)}/{d.name}" for d in self.defenses]
        names += ["pgd"] if self.pgd_steps else []
        names += [f"bpda/{d.name}" for d in self.defenses] if self.bpda else []
        return names

    def describe(self, input_name: str) -> dict[str, object]:
        """What an input kind is: its attack, budget, defense, and whether the attack adapts to it."""
        kind, _, defense = input_name.partition("/")
        attack, eps = {"clean": ("none", 0.0), "fgsm": ("FGSM", self.eps), "pgd": ("PGD", self.eps),
                       "bpda": ("BPDA-FGSM", self.eps)}.get(kind, ("FGSM", None))
        if eps is None:  # fgsm_eps<ε>
            eps = float(kind.removeprefix("fgsm_eps"))
        return {"attack": attack, "eps": eps, "defense": defense or "none", "adaptive": kind == "bpda"}

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
        if self.pgd_steps:
            with self.timer("pgd"):
                inputs["pgd"] = run_attack(pgd(model, self.eps, steps=self.pgd_steps), images, labels)
        if self.bpda:
            for defense in self.defenses:
                with self.timer(f"bpda {defense.name}"):
                    adversarial = run_attack(fgsm(BPDA(model, defense), self.eps), images, labels)
                    inputs[f"bpda/{defense.name}"] = defense(adversarial)
        return inputs


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


def scalar_tags(results: dict) -> dict[str, float]:
    """:meth:`RobustnessMetrics.compute` as flat TensorBoard tag suffixes: ``<input>/acc`` …"""
    tags = {f"{name}/acc": value for name, value in results["acc"].items()}
    tags |= {f"{name}/attack_success": value for name, value in results["attack_success"].items()}
    tags |= {f"{name}/acc_class/{c}": v for name, per in results["acc_class"].items() for c, v in per.items()}
    if results["agreement"] is not None:
        tags["clean/agreement"] = results["agreement"]
    tags["images"] = results["images"]
    return tags
