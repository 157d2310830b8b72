"""The test-time study: every model under test scored on the same attacked and defended images.

A :class:`Study` owns what a test run makes: the input kinds of each batch (made once, on the
first model under test), the strong attacks' subset and its per-image robust masks, the figures'
samples, the stage times and the report. What it studies is added through its interface:
``set_attacks`` (the attacks and defenses) and ``add_model`` (the int8 copies, any model a user
brings). The callbacks (``callbacks/``) drive it from ``trainer.test``; ``api.evaluate`` drives it
from a plain loop. Neither knows where a model came from.

Per batch: ``update``. At the end: ``finish`` (metrics synced over ranks, strong attacks per
model), then ``figures``, ``robust_masks``, ``write`` (rank 0) and :func:`publish` (TensorBoard).
"""

import copy
import hashlib
import io
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from cifar_lightning.attacks import attack_chain
from cifar_lightning.checks import AttackChecks, CheckCounts
from cifar_lightning.dashboard import log_hparams
from cifar_lightning.data import CLASSES
from cifar_lightning.errors import ConfigError
from cifar_lightning.evaluation import (
    CLEAN,
    AttackSuite,
    CorruptionSuite,
    InputKind,
    ModelUnderTest,
    RobustAccuracy,
    RobustnessMetrics,
    RunUnit,
    StageTimer,
    StrongAttacks,
    as_unit,
    fgsm_kind,
    mean_corruption_error,
    pgd_with_restarts,
    predicted_labels,
    stratified_subset,
)
from cifar_lightning.files import write_atomic
from cifar_lightning.journal import Journal
from cifar_lightning.model_card import About, corruptions_entry, entry_json, model_card, robustbench_entry
from cifar_lightning.quantization import cpu_latency, state_dict_megabytes
from cifar_lightning.report import Report, accuracy_bars, corruption_bars, eps_curve, prediction_figure, sample_grid

Gather = Callable[[object], list]
"""An object from this process → the list of every process's (under DDP: ``all_gather_object``)."""


def _local(value: object) -> list:
    return [value]


class Study:
    """The robustness study of ``primary`` and the models added to it.

    Args:
        primary: the model the attacks are crafted on (``fp32``: the trained network).
        latency_batch_size: batch of each model's CPU latency measurement.
    """

    def __init__(self, primary: ModelUnderTest, latency_batch_size: int = 128) -> None:
        self.models = {primary.name: primary}
        self.attacks: AttackSuite | None = None
        self.strong: StrongAttacks | None = None
        self.checks: AttackChecks | None = None
        self.corruptions: CorruptionSuite | None = None
        self.subset_size: int | None = None
        self.seed = 0
        self.sample: str | int | None = None
        self.latency_batch_size = latency_batch_size
        self.timer = StageTimer()
        self.report = Report()
        self.masks: dict[str, Tensor] = {}  # "<model>/<input>" → (subset images,) bool
        self.begun = False

    @property
    def primary(self) -> ModelUnderTest:
        return next(iter(self.models.values()))

    @property
    def eps(self) -> float | None:
        return None if self.attacks is None else self.attacks.eps

    def hparams(self) -> dict[str, object]:
        """This study's columns of the HPARAMS row: the test ε and the defenses."""
        defenses = ", ".join(d.name for d in self.attacks.defenses) if self.attacks else ""
        return {"eps_test": self.eps if self.eps is not None else 0.0, "defenses": defenses or "none"}

    def set_attacks(self, attacks: AttackSuite, strong: StrongAttacks | None, subset: int | None = 1000,
                    seed: int = 0, sample: str | int | None = "ship", checks: AttackChecks | None = None) -> None:
        """The per-batch attacks and defenses, the strong attacks on a seeded stratified ``subset`` of
        that many test images (None: all), the figure's image (a test index or a class name), and the
        attack-failure checks to run beside the strong attacks (``checks.AttackChecks``)."""
        self.attacks, self.strong, self.subset_size, self.seed, self.sample = attacks, strong, subset, seed, sample
        self.checks = checks if strong is not None else None

    def set_corruptions(self, corruptions: CorruptionSuite) -> None:
        """The common corruptions, scored on every model under test on their own subset."""
        self.corruptions = corruptions

    def add_model(self, model: ModelUnderTest) -> None:
        if self.begun:
            raise RuntimeError(f"Study: {model.name!r} added after the first batch; add models before it")
        if model.name in self.models:
            raise ValueError(f"Study: a model named {model.name!r} is already under test")
        self.models[model.name] = model

    def note(self, message: str) -> None:
        """A line for the reader of the results (something not run, and why); printed now too."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            print(f"cifar-lightning: {message}")
        self.report.notes.append(message)

    def kinds(self, model: ModelUnderTest) -> list[InputKind]:
        """The per-batch input kinds ``model`` is scored on."""
        if self.attacks is None:
            return [CLEAN]
        return [kind for kind in self.attacks.kinds if model.sweep or not kind.sweep]

    # Per batch.

    def begin(self, labels: Tensor, batch_size: int, device: torch.device, journal: Journal | None = None,
              order: Sequence[int] | None = None) -> None:
        """Before the first batch: ``labels`` of the whole test set (N,); the strong attacks run on the
        subset in batches of ``batch_size``; metrics live on ``device`` (synced from there).

        ``journal``: where each finished unit of work is kept (a test batch, an attack member on a
        batch of the subset), and read back from when it holds this study's; by default nowhere.
        ``order``: this process's test indices in the order its batches come (default: all, in order),
        part of what makes the journal this study's."""
        if isinstance(self.sample, int) and not 0 <= self.sample < len(labels):
            raise ConfigError(f"invalid configuration: RobustnessEvaluation: sample={self.sample} is not an index of "
                              f"the test set (0 to {len(labels) - 1}). Fix: pass an index in that range or a class "
                              f"name such as ship.")
        if self.strong is not None and self.subset_size is not None and self.subset_size > len(labels):
            raise ConfigError(f"invalid configuration: RobustnessEvaluation: subset={self.subset_size} is larger than "
                              f"the test set ({len(labels)} images). Fix: pass at most {len(labels)}, or null for all.")
        self.batch_size, self.device = batch_size, device
        self.metrics = {name: RobustnessMetrics(self.kinds(model), device, on_subset=[
            kind.name for kind in self.kinds(model) if self.attacks and self.attacks.on_subset(kind)])
            for name, model in self.models.items()}
        self.subset_indices = set(stratified_subset(labels, self.subset_size, self.seed).tolist())
        self.subset: dict = {"index": [], "images": [], "labels": [], "standing": {name: [] for name in self.models}}
        corruptions = self.corruptions
        self.corrupted_indices = set(stratified_subset(labels, corruptions.images, corruptions.seed).tolist()) \
            if corruptions else set()
        # The corruptions' subset, clean, and each model's predictions of it (a column per model under test).
        self.corrupted: dict = {"index": [], "images": [], "labels": [], "clean_preds": []}
        self.samples: dict[int, dict] = {}  # test index → images and each model's predictions
        for model in self.models.values():
            self._measure(model)
        self.journal = journal or Journal()
        self.journal.open(self._fingerprint(labels, range(len(labels)) if order is None else order))
        self.begun = True

    def _fingerprint(self, labels: Tensor, order: Sequence[int]) -> str:
        """What this study's numbers depend on, as a digest: every model (its layers and weights), the
        test labels in this process's order, the batches, the attacks, defenses and subset."""
        digest = hashlib.sha256()
        for model in self.models.values():
            for module in (model.model, model.surrogate):
                buffer = io.BytesIO()
                torch.save(module.state_dict() if module is not None else None, buffer)
                digest.update(f"{model.name} {model.gradients} {model.sweep} {module!r}".encode() + buffer.getvalue())
        defenses = [(type(d).__qualname__, sorted(vars(d).items())) for d in (self.attacks.defenses if self.attacks else [])]
        suite = vars(self.attacks) | {"defenses": None} if self.attacks is not None else None
        strong = vars(self.strong) | {"defenses": None} if self.strong is not None else None
        checks = vars(self.checks) if self.checks is not None else None
        corruptions = vars(self.corruptions) if self.corruptions is not None else None
        digest.update(repr((labels.tolist(), list(order), self.batch_size, [self.kinds(m) for m in self.models.values()],
                            defenses, suite, strong, checks, corruptions, sorted(self.subset_indices),
                            self.sample)).encode())
        return digest.hexdigest()

    def _measure(self, model: ModelUnderTest) -> None:
        """Size and CPU latency of ``model`` for the summary."""
        with self.timer("cpu latency runs"):
            on_cpu = model.model if model.device.type == "cpu" else copy.deepcopy(model.model).cpu()
            latency = cpu_latency(on_cpu, batch_size=self.latency_batch_size)
        self.report.add_model_info(
            model.name, size_mb=state_dict_megabytes(model.model), cpu_ms_per_batch=latency["ms_per_batch"],
            cpu_images_per_s=latency["images_per_s"], cpu_threads=latency["threads"], eval_device=str(model.device))

    def update(self, images: Tensor, labels: Tensor, indices: list[int], clean_logits: Tensor | None = None) -> None:
        """One test batch: [0, 1] ``images`` (N, 3, H, W), ``labels`` (N,) and their test-set ``indices``;
        ``clean_logits``: the first model's logits (N, classes) of ``images`` when the caller has them
        already (``ClassifierModule.test_step``), so that no image goes through a model twice."""
        record, _ = self.journal.unit(f"batch{indices[0]}", partial(self._batch, images, labels, indices, clean_logits))
        for stage, seconds in record["seconds"].items():
            self.timer.seconds[stage] += seconds
        primary, positions = record["preds"][self.primary.name], record["positions"]
        for name, preds in record["preds"].items():
            self.metrics[name].update(preds, labels, None if name == self.primary.name else primary[CLEAN.name],
                                      positions)
        self.samples |= record["samples"]
        for key, part in record["subset"].items():
            self.subset[key].append(part)
        for key, part in record["corrupted"].items():
            self.corrupted[key].append(part)
        for name, part in record["standing"].items():
            self.subset["standing"][name].append(part)

    def _batch(self, images: Tensor, labels: Tensor, indices: list[int], clean_logits: Tensor | None) -> dict:
        """What the study makes of a batch: each model's predicted labels by input kind, the figures'
        new samples, the batch's images of the subset and where each model's chains start there, and the
        seconds of each stage."""
        primary, timer = self.primary, StageTimer()
        positions = torch.tensor([p for p, index in enumerate(indices) if index in self.subset_indices],
                                 dtype=torch.long, device=labels.device)  # the batch's images of the subset
        inputs = self.attacks(primary.model, images, labels, timer, positions) if self.attacks else {CLEAN.name: images}
        kinds = {name: self.kinds(model) for name, model in self.models.items()}
        logits = {name: {} for name in self.models}
        if clean_logits is not None:
            logits[primary.name][CLEAN.name] = clean_logits
        for kind in self.attacks.kinds if self.attacks else [CLEAN]:
            scored_by = [name for name in self.models if kind in kinds[name] and kind.name not in logits[name]]
            for name, found in self._logits(inputs[kind.name], scored_by, timer).items():
                logits[name][kind.name] = found
        probabilities = {name: {kind.name: logits[name][kind.name].softmax(dim=1).to(labels.device)
                                for kind in kinds[name]} for name in self.models}
        corrupted = [p for p, index in enumerate(indices) if index in self.corrupted_indices]
        return {
            "preds": {name: {kind: p.argmax(dim=1) for kind, p in found.items()} for name, found in probabilities.items()},
            "positions": positions,
            "samples": self._new_samples(indices, labels, inputs, probabilities) if self.attacks is not None else {},
            "subset": {"index": torch.tensor(indices)[positions.cpu()], "images": images[positions],
                       "labels": labels[positions]} if self.strong is not None else {},
            "standing": {name: self.attacks.standing(found, labels, positions)
                         for name, found in probabilities.items()} if self.strong is not None else {},
            "corrupted": {"index": torch.tensor(indices)[corrupted], "images": images[corrupted],
                          "labels": labels[corrupted],
                          "clean_preds": torch.stack([found[CLEAN.name].argmax(dim=1)[corrupted]
                                                      for found in probabilities.values()], dim=1)} if corrupted else {},
            "seconds": dict(timer.seconds),
        }

    @torch.inference_mode()
    def _logits(self, images: Tensor, names: Sequence[str], timer: StageTimer) -> dict[str, Tensor]:
        """Each named model's logits of the same ``images`` (N, 3, H, W), one pass each, or one for two: a
        model with a ``joint`` pass runs it for the first model too when both are named (timed as the
        first model's passes). Inputs go in channels_last: faster for FP32 convolutions, neutral for int8."""
        logits, first = {}, self.primary.name
        if not len(images):  # a batch with no image of the subset, for a kind made on the subset alone
            return {name: images.new_zeros(0, len(CLASSES)) for name in names}
        for name in sorted(names, key=lambda name: self.models[name].joint is None):  # joint passes first
            model = self.models[name]
            batch = images.to(model.device).contiguous(memory_format=torch.channels_last)
            if model.joint is not None and first in names and first not in logits:
                with timer(f"{first} model passes"):
                    logits[first], logits[name] = model.joint(batch)
            elif name not in logits:
                with timer(f"{name} model passes"):
                    logits[name] = model.model(batch)
        return logits

    @property
    def figure_kinds(self) -> list[InputKind]:
        main = fgsm_kind(self.attacks.eps)
        return [CLEAN, main] + [main.defended(d) for d in self.attacks.defenses]

    def _new_samples(self, indices: list[int], labels: Tensor, inputs: dict[str, Tensor],
                     probabilities: dict[str, dict[str, Tensor]]) -> dict[int, dict]:
        """The batch's figure candidates: per class the first image the first model gets right and FGSM
        flips, the requested index, and the first image of the requested class (the figure's fallback
        when none of that class is flipped). Shards are in index order, so the first seen is the first."""
        primary = probabilities[self.primary.name]
        preds = {kind: primary[kind].argmax(1) for kind in (CLEAN.name, "fgsm")}
        flipped = (preds[CLEAN.name] == labels) & (preds["fgsm"] != labels)
        shown = [kind.name for kind in self.figure_kinds]
        samples = {}
        for position, index in enumerate(indices):
            label = int(labels[position])
            kept = [s for s in [*self.samples.values(), *samples.values()] if s["label"] == label]
            first_flipped = bool(flipped[position]) and not any(s["flipped"] for s in kept)
            first_of_class = CLASSES[label] == self.sample and not kept
            if first_flipped or first_of_class or index == self.sample:
                samples[index] = {
                    "label": label,
                    "flipped": bool(flipped[position]),
                    "images": {kind: inputs[kind][position].cpu() for kind in shown},
                    "probabilities": {model: {kind: found[kind][position].cpu() for kind in shown}
                                      for model, found in probabilities.items()},
                }
        return samples

    # At the end.

    def finish(self, gather: Gather = _local, progress: bool = False) -> None:
        """Compute every model's numbers (synced over ranks), run the strong attacks on this process's
        share of the subset, and gather the figures' samples from every process (``gather``)."""
        if not self.begun:
            raise RuntimeError("Study.finish: no batch was evaluated")
        self.subset = {key: torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
                       for key, parts in self.subset.items() if key != "standing"} | {"standing": {
                           name: {kind: torch.cat([part[kind] for part in parts]) for kind in parts[0]} if parts else {}
                           for name, parts in self.subset["standing"].items()}}
        for name, model in self.models.items():
            results = self.metrics[name].compute()
            self.report.add(name, results, self.kinds(model))
            if model is self.primary:
                self.accuracy = dict(results["acc"])
            if self.strong is not None:
                self._strong_attacks(model, progress)
        if self.corruptions is not None:
            self._corruption_study(progress)
        self.samples = dict(sorted({index: sample for part in gather(self.samples)
                                    for index, sample in part.items()}.items()))
        if self.journal.replayed:
            self.note(f"resumed: {self.journal.replayed} finished units of work (test batches, attack members) of "
                      f"the interrupted run were read back from its journal")

    def _subset_batches(self, description: str, progress: bool, size: int | None = None) -> Iterable[slice]:
        """Slices of the subset (of ``size`` images: by default the strong attacks'), one test batch each
        (random starts are drawn per batch)."""
        starts = range(0, len(self.subset["labels"]) if size is None else size, self.batch_size)
        for start in tqdm(starts, desc=description, disable=not progress, leave=False):
            yield slice(start, start + self.batch_size)

    def _strong_attacks(self, model: ModelUnderTest, progress: bool) -> None:
        """The strong attacks on ``model``: its own white-box chains and adaptive attacks when it has
        gradients, else the first model's worst case (transfer) and PGD on its surrogate."""
        kinds = self.strong.kinds if model.gradients else \
            self.strong.without_gradients_kinds(model.surrogate is not None)
        metrics, counts = RobustAccuracy(kinds, self.device), CheckCounts(self.device)
        agreement = MulticlassAccuracy(len(CLASSES), average="micro").to(self.device)
        masks, adversarial = [], []
        for part in self._subset_batches(f"{model.name}: strong attacks", progress):
            images = self.subset["images"][part].to(model.device)
            labels = self.subset["labels"][part].to(model.device)
            standing = {kind: right[part].to(model.device) for kind, right in self.subset["standing"][model.name].items()}
            # Journal keys of this part's attack members: the part's first test index names it on every rank.
            units = f"{model.name}/subset{int(self.subset['index'][part][0])}"
            run_unit = lambda stage, name, compute, units=units: self._unit(stage, f"{units}/{name}", compute)
            if model.gradients:
                # The costly checks' slice: the subset's first images.
                sliced = torch.arange(part.start, part.start + len(labels), device=labels.device) < (
                    self.checks.images if self.checks else 0)
                robust, worst, evidence = self.strong(model.model, images, labels, standing, run_unit, sliced)
                if self.checks is not None:
                    evidence |= self.checks(model.model, images, labels, robust, sliced, self.strong, run_unit)
                counts.update(evidence)
                robust[CLEAN.name] = standing[CLEAN.name]
                adversarial.append(worst)
            else:
                robust = self._without_gradients(model, images, labels, standing["fgsm"], part, agreement, run_unit)
            metrics.update({kind: mask.to(self.device) for kind, mask in robust.items()})
            masks.append(robust)
        if model is self.primary:
            self.subset["adversarial"] = torch.cat(adversarial) if adversarial else self.subset["images"]
        self.masks |= {f"{model.name}/{kind.name}": torch.cat([m[kind.name] for m in masks]).cpu() if masks
                       else torch.empty(0, dtype=torch.bool) for kind in kinds}
        results = metrics.compute()
        self.report.add(model.name, results, kinds)
        if model.gradients and self.checks is not None:
            self.report.add_flags(self.checks.flags(model.name, counts.compute(), self.strong))
        if model.surrogate is not None:
            self.report.add_model_info(model.name, surrogate_agreement=agreement.compute().item())
        if model is self.primary:
            self.accuracy |= results["acc"] | {"clean (subset)": results["clean_acc"]}

    def _corruption_study(self, progress: bool) -> None:
        """Every model under test on each corruption of the corruptions' subset, each corrupted image made
        once; per model the mean accuracy over the corruptions, and against the first model its mCE. The
        clean row takes the test batches' predictions: no clean image goes through a model twice."""
        collected = {key: torch.cat(parts) for key, parts in self.corrupted.items() if parts}
        kinds = self.corruptions.kinds
        clean, corruptions = kinds[0], kinds[1:]
        metrics = {name: RobustnessMetrics(kinds, self.device) for name in self.models}
        for part in self._subset_batches("common corruptions", progress, len(collected.get("labels", []))):
            images, labels, indices = (collected[key][part] for key in ("images", "labels", "index"))
            found = {clean.name: dict(zip(self.models, collected["clean_preds"][part].unbind(dim=1)))} | {
                kind.name: self._unit(f"corruption {kind.corruption}", f"corruptions{int(indices[0])}/{kind.name}",
                                      partial(self._corrupted_predictions, kind, images, labels, indices))
                for kind in corruptions}
            for name, metric in metrics.items():
                metric.update({kind: predictions[name] for kind, predictions in found.items()}, labels)
        accuracy = {}
        for name, metric in metrics.items():
            results = metric.compute()
            self.report.add(name, results, kinds)
            accuracy[name] = {kind: results["acc"][kind.name] for kind in kinds}
            info = {"corruption_acc": sum(accuracy[name][kind] for kind in corruptions) / len(corruptions)}
            if name != self.primary.name:
                first = accuracy[self.primary.name]
                info |= {"mce_vs_fp32": mean_corruption_error(accuracy[name], first),
                         "relative_mce_vs_fp32": mean_corruption_error(accuracy[name], first, relative=True)}
            self.report.add_model_info(name, **info)

    def _corrupted_predictions(self, kind: InputKind, images: Tensor, labels: Tensor, indices: Tensor) -> dict:
        corrupted = self.corruptions(kind, images, indices)
        logits = self._logits(corrupted, list(self.models), StageTimer())  # timed as the corruption's
        return {name: found.argmax(dim=1).to(labels.device) for name, found in logits.items()}

    def _unit(self, stage: str, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, timed under ``stage`` and journaled under ``key``."""
        value, seconds = self.journal.unit(key, compute)
        self.timer.seconds[stage] += seconds
        return value

    def _without_gradients(self, model: ModelUnderTest, images: Tensor, labels: Tensor, standing: Tensor,
                           part: slice, agreement: MulticlassAccuracy, run_unit: RunUnit) -> dict[str, Tensor]:
        """Robust masks of a model without gradients on a part of the subset: under the first model's
        worst-case images, and under PGD on its surrogate (``agreement``: surrogate vs model, clean)."""
        judge, strong = partial(predicted_labels, model.model), self.strong
        transfer, *whitebox = strong.without_gradients_kinds(model.surrogate is not None)
        robust = {CLEAN.name: judge(images) == labels}
        with self.timer(f"{model.name} transfer"):
            worst = self.subset["adversarial"][part].to(model.device)
            robust[transfer.name] = standing & (judge(worst) == labels)
        if whitebox:
            attack = pgd_with_restarts(model.surrogate, strong.eps, strong.pgd_steps, strong.pgd_restarts,
                                       strong.seed, judge=judge, surrogate=True)
            name = whitebox[0].name
            robust[name] = attack_chain({name: as_unit(run_unit, f"{model.name} white-box", name, attack)}, judge,
                                        images, labels, standing)[1][name]
            agreement.update(predicted_labels(model.surrogate, images).to(self.device), judge(images).to(self.device))
        return robust

    def robust_masks(self, gather: Gather = _local) -> pd.DataFrame | None:
        """Per subset image (test index, label): 1 if robust under each ``<model>/<input>``, from every
        process; with it anyone can recompute (or combine) the strong attacks' numbers."""
        if self.strong is None:
            return None
        table = {"index": self.subset["index"].tolist(), "label": self.subset["labels"].tolist()}
        table |= {name: mask.int().tolist() for name, mask in self.masks.items()}
        parts = gather(table)
        return pd.DataFrame({key: [value for part in parts for value in part[key]] for key in table}).sort_values("index")

    def eps_curves(self) -> tuple[list[float], dict[str, list[float]], str]:
        """The first model's accuracy against ε, as in ``results.csv``, and the figure's title: FGSM with and
        without each defense (at the sweep's budgets on the subset, with ``sweep_on_subset``); PGD and the
        chain's last member on the subset."""
        eps = sorted({0.0, self.attacks.eps, *self.attacks.eps_sweep})
        at = {0.0: CLEAN} | {kind.eps: kind for kind in self.attacks.attacked_kinds}
        curves = {"FGSM": [self.accuracy[at[e].name] for e in eps]}
        for defense in self.attacks.defenses:
            curves[f"FGSM, {defense.name}"] = [self.accuracy[at[e].defended(defense).name] for e in eps]
        if self.strong is not None:
            for member, label in [("pgd", "PGD"), *[(m, f"worst case to {m.upper()}") for m in self.strong.ensemble[-1:]]]:
                chains = [{kind.attack: kind.name for kind in self.strong.chain(e)} for e in eps[1:]]
                curves[f"{label} (subset)"] = [self.accuracy["clean (subset)"]] + [
                    self.accuracy[chain[member]] if member in chain else float("nan") for chain in chains]  # nan: not run
        title = f"{self.primary.name}: accuracy against ε"
        if self.attacks.eps_sweep and self.attacks.sweep_on_subset:
            title += f"\n(the ε sweep on the {len(self.subset_indices):,}-image subset)"
        return eps, curves, title

    def main_sample(self) -> dict | None:
        """The image of the seed's figure: the requested index, or the first image of the requested
        class that the model gets right and FGSM flips, else the first image of that class."""
        candidates = [(not s["flipped"], index, s) for index, s in self.samples.items()
                      if index == self.sample or CLASSES[s["label"]] == self.sample]
        if not candidates:
            return None
        _, index, sample = min(candidates, key=lambda candidate: candidate[:2])
        return sample | {"index": index}

    def figures(self) -> dict[str, Figure]:
        figures = {}
        if self.corruptions is not None:
            images = f"{self.corruptions.images:,} test images" if self.corruptions.images else "every test image"
            figures["corruption_bars"] = corruption_bars(
                self.report.details(), f"Accuracy under the common corruptions,\nmean over severities ({images})")
        if self.attacks is None:
            return figures
        figures |= {"accuracy_bars": accuracy_bars(self.report.rows_with_kinds(), self.attacks.eps),
                   "eps_curve": eps_curve(*self.eps_curves())}
        sample = self.main_sample()
        if sample is not None:
            note = "" if sample["flipped"] or isinstance(self.sample, int) else ", none of its class flipped by FGSM"
            figures["sample"] = prediction_figure(sample["images"], sample["probabilities"], sample["label"],
                                                  f"test image {sample['index']}{note}")
        by_class = {}
        for sample in self.samples.values():
            if sample["flipped"]:
                by_class.setdefault(sample["label"], sample)
        if by_class:
            primary = self.primary.name
            rows = [(s["images"], s["probabilities"][primary], s["label"]) for _, s in sorted(by_class.items())]
            figures["samples_grid"] = sample_grid(rows, primary)
        return figures

    def write(self, folder: Path, figures: dict[str, Figure], robust_masks: pd.DataFrame | None,
              about: About | None = None) -> None:
        """The run's files (``results.csv``, ``summary.csv``, …, figures as PNG) into ``folder``; given
        ``about`` the weights, their RobustBench entries (``robustbench.json``, and
        ``robustbench_corruptions.json`` when every corruption ran) and ``model_card.md`` too."""
        self.report.robust_masks = robust_masks
        self.report.stage_seconds = dict(self.timer.seconds)
        self.report.write(folder, figures)
        if about is not None:
            rows = self.report.rows_with_kinds()
            entry, corruptions = robustbench_entry(rows, about), corruptions_entry(rows, about)
            write_atomic(folder / "robustbench.json", entry_json(entry))
            if corruptions is not None:
                write_atomic(folder / "robustbench_corruptions.json", entry_json(corruptions))
            write_atomic(folder / "model_card.md", model_card(entry, self.report.headline(), corruptions).encode())


def publish(study: Study, logger, step: int, figures: dict[str, Figure], hparams: dict[str, object], trial: str,
            logged_elsewhere: tuple[str, ...] = ()) -> None:
    """The study in TensorBoard (a Lightning logger): figures, one text entry per table, the headline
    scalars (but for ``logged_elsewhere``) and the run's HPARAMS row named ``trial``."""
    experiment = logger.experiment
    for name, figure in figures.items():
        experiment.add_figure(f"test/{name}", figure, global_step=step, close=False)
    study.report.stage_seconds = dict(study.timer.seconds)
    for name, table in study.report.tables().items():
        experiment.add_text(f"test/{name}", table, global_step=step)
    headline = {tag: value for tag, (value, _) in study.report.headline().items() if tag not in logged_elsewhere}
    logger.log_metrics(headline, step=step)
    log_hparams(logger, hparams, trial)
