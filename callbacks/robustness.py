"""RobustnessEvaluation: FGSM and the defenses over the whole test set, strong attacks on a subset."""

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import lightning as L
import pandas as pd
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from cifar_lightning.attacks import ENSEMBLE_MEMBERS, check_at_least_one, check_eps
from cifar_lightning.dashboard import log_hparams, training_hparams, trial_name
from cifar_lightning.data import CLASSES
from cifar_lightning.defenses import Defense, default_defenses
from cifar_lightning.errors import ConfigError
from cifar_lightning.evaluation import (
    AttackSuite,
    RobustAccuracy,
    RobustnessMetrics,
    StrongAttacks,
    predict,
    stratified_subset,
    sweep_name,
)
from cifar_lightning.report import Report, accuracy_bars, eps_curve, prediction_figure, sample_grid

MODEL = "fp32"


def _concatenate(parts: dict[str, list]) -> dict:
    """The subset's per-batch parts joined: a tensor per key, a dict of tensors for ``standing``."""
    joined = {key: torch.cat(values) if values else torch.empty(0) for key, values in parts.items()
              if key != "standing"}
    standing = parts["standing"]
    return joined | {"standing": {k: torch.cat([p[k] for p in standing]) for k in standing[0]} if standing else {}}


class RobustnessEvaluation(L.Callback):
    """During ``trainer.test``: attack every test batch with FGSM and apply each defense to the clean
    and the attacked images; then run the strong attacks (PGD, the AutoAttack-style ensemble, the
    adaptive attack on each defense) on a fixed, seeded, class-stratified subset of the test set.

    TensorBoard gets what a person reads at a glance (``dashboard.py``): the headline accuracies
    as ``test/…`` scalars and the run's HPARAMS row; the tables as text (``test/summary``,
    ``test/tables/every_input``, ``…/per_class``, ``…/stage_times``); the figures as images. The run
    folder gets ``results.csv``, ``summary.csv``, ``per_class.csv``, ``results.md``, ``robust_masks.csv`` (per image of
    the subset and input kind: robust or not) and the figures as PNG (rank 0). Other callbacks
    (``QuantizationEvaluation``) reuse the images it makes for each batch (``self.inputs``) and for
    the subset, and add their rows to ``self.report`` before it is written.

    Args:
        eps: attack budget in [0, 1] pixel space (L∞).
        defenses: defenses to evaluate; the seed's four (Gaussian k3, JPEG q30, median k3, TV 0.1)
            by default.
        eps_sweep: further budgets for the accuracy-vs-ε curve (FGSM with and without defenses on
            every image; PGD and the ensemble on the subset).
        sample: the image of the seed's figure: a test-set index, or a class name for the first
            test image of that class that the model gets right and FGSM flips.
        strong_attacks: run the strong attacks on the subset.
        subset: test images the strong attacks run on (class-stratified, seeded); null for all.
        pgd_steps, pgd_restarts: PGD's steps (step size 2.5·ε/steps) and random starts.
        ensemble: AutoAttack members to run after PGD, from apgd-ce, apgd-t, fab-t, square.
        sweep_ensemble: run the ensemble at each ``eps_sweep`` budget too (PGD always runs there).
        adaptive: the adaptive PGD through each defense.
        seed: seed of the subset and of every random start.
    """

    def __init__(
        self,
        eps: float = 0.03,
        defenses: list[Defense] | None = None,
        eps_sweep: list[float] = (1 / 255, 2 / 255, 4 / 255, 16 / 255),
        sample: str | int = "ship",
        strong_attacks: bool = True,
        subset: int | None = 1000,
        pgd_steps: int = 20,
        pgd_restarts: int = 1,
        ensemble: list[str] = ("apgd-ce", "apgd-t"),
        sweep_ensemble: bool = False,
        adaptive: bool = True,
        seed: int = 0,
    ) -> None:
        owner = "RobustnessEvaluation"
        for name, value in [("eps", eps)] + [("eps_sweep", e) for e in eps_sweep]:
            check_eps(owner, value, name)
        check_at_least_one(owner, pgd_steps=pgd_steps, pgd_restarts=pgd_restarts)
        if subset is not None:
            check_at_least_one(owner, subset=subset)
        unknown = [name for name in ensemble if name not in ENSEMBLE_MEMBERS]
        if unknown:
            raise ValueError(f"{owner}: ensemble={list(ensemble)} has unknown attack {unknown[0]!r}; choose from "
                             f"{', '.join(ENSEMBLE_MEMBERS)}")
        if isinstance(sample, str) and sample not in CLASSES:
            raise ValueError(f"{owner}: sample={sample!r} must be a test index or one of {CLASSES}")
        defenses = default_defenses() if defenses is None else defenses
        eps_sweep = sorted(set(eps_sweep) - {0.0, eps})
        self.suite = AttackSuite(eps, defenses, eps_sweep)
        self.strong = StrongAttacks(eps, defenses, eps_sweep, pgd_steps, pgd_restarts, ensemble, sweep_ensemble,
                                    adaptive, seed) \
            if strong_attacks else None
        self.subset_size, self.seed = subset, seed
        self.sample = sample
        self.report = Report()
        self.inputs: dict[str, Tensor] = {}
        self.probabilities: dict[str, Tensor] = {}

    @property
    def figure_inputs(self) -> list[str]:
        return ["clean", "fgsm"] + [f"fgsm/{d.name}" for d in self.suite.defenses]

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics = RobustnessMetrics(self.suite.input_names, pl_module.device)
        self.report = Report()
        self.samples: dict[int, dict] = {}  # test index → images and predictions
        loader = trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, list) else loader
        self._indices, self._batch_size = list(loader.sampler), loader.batch_size
        self.subset: dict[str, list] = {"index": [], "images": [], "labels": [], "standing": []}
        self.subset_positions = torch.empty(0, dtype=torch.long)  # of the current batch
        test_labels = loader.dataset.tensors[1]
        if isinstance(self.sample, int) and not 0 <= self.sample < len(test_labels):
            raise ConfigError(f"invalid configuration: RobustnessEvaluation: sample={self.sample} is not an index of "
                              f"the test set (0 to {len(test_labels) - 1}). Fix: pass an index in that range or a "
                              f"class name such as ship.")
        if self.strong is not None:
            if self.subset_size is not None and self.subset_size > len(test_labels):
                raise ConfigError(f"invalid configuration: RobustnessEvaluation: subset={self.subset_size} is larger "
                                  f"than the test set ({len(test_labels)} images). Fix: pass at most "
                                  f"{len(test_labels)}, or null for all.")
            self._subset_indices = set(stratified_subset(test_labels, self.subset_size, self.seed).tolist())

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        images, labels = batch
        self.inputs = self.suite(pl_module, images, labels)
        with self.suite.timer("fp32 model passes"):
            self.probabilities = predict(pl_module.net, self.inputs)
        self.metrics.update(self.probabilities, labels)
        start = batch_idx * self._batch_size
        indices = self._indices[start:start + len(labels)]
        self._keep_samples(indices, labels)
        if self.strong is not None:
            self._keep_subset(indices, images, labels)

    def _keep_subset(self, indices: list[int], images: Tensor, labels: Tensor) -> None:
        """The batch's images of the strong attacks' subset, with where their chains start."""
        positions = [p for p, index in enumerate(indices) if index in self._subset_indices]
        self.subset_positions = torch.tensor(positions, dtype=torch.long, device=labels.device)
        standing = self.strong.standing(self.probabilities, labels)
        for key, value in (("index", torch.tensor(indices)[positions]), ("images", images[self.subset_positions]),
                           ("labels", labels[self.subset_positions]),
                           ("standing", {k: v[self.subset_positions] for k, v in standing.items()})):
            self.subset[key].append(value)

    def _keep_samples(self, indices: list[int], labels: Tensor) -> None:
        """Keep the figure candidates: per class the first image the model gets right and FGSM flips,
        the requested index, and the first image of the requested class (the figure's fallback when
        none of that class is flipped). Shards are in index order, so the first seen is the first."""
        preds = {kind: self.probabilities[kind].argmax(1) for kind in ("clean", "fgsm")}
        flipped = (preds["clean"] == labels) & (preds["fgsm"] != labels)
        for position, index in enumerate(indices):
            label = int(labels[position])
            kept = [s for s in self.samples.values() if s["label"] == label]
            first_flipped = bool(flipped[position]) and not any(s["flipped"] for s in kept)
            first_of_class = CLASSES[label] == self.sample and not kept
            if first_flipped or first_of_class or index == self.sample:
                self.samples[index] = {
                    "label": label,
                    "flipped": bool(flipped[position]),
                    "images": {k: self.inputs[k][position].cpu() for k in self.figure_inputs},
                    "probabilities": {MODEL: {k: self.probabilities[k][position].cpu() for k in self.figure_inputs}},
                }

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self.metrics.compute()
        self.report.add(MODEL, results, self.suite.describe)
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, self.samples)
            self.samples = {index: s for part in gathered for index, s in part.items()}
        self.samples = dict(sorted(self.samples.items()))
        self.subset_masks: dict[str, Tensor] = {}  # "<model>/<input>" → (subset images,) bool
        accuracy = results["acc"]
        if self.strong is not None:
            self.subset = _concatenate(self.subset)
            accuracy = accuracy | self._strong_attacks(trainer, pl_module)
        self.eps_accuracy = self._eps_accuracy(accuracy)

    def subset_batches(self, trainer: L.Trainer, description: str) -> Iterator[slice]:
        """Slices of the subset, one test batch each, under a progress bar (rank 0)."""
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        for start in tqdm(range(0, len(self.subset["labels"]), self._batch_size), desc=description, disable=not show,
                          leave=False):
            yield slice(start, start + self._batch_size)

    def _strong_attacks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run the strong attacks on this rank's share of the subset; log and report them."""
        metrics = RobustAccuracy(self.strong.input_names, pl_module.device)
        masks, adversarial = [], []
        for part in self.subset_batches(trainer, "strong attacks"):
            standing = {k: v[part] for k, v in self.subset["standing"].items()}
            robust, worst = self.strong(pl_module.net, self.subset["images"][part], self.subset["labels"][part],
                                        standing, self.suite.timer)
            metrics.update(robust | {"clean": standing["clean"]})
            masks.append(robust)
            adversarial.append(worst)
        self.subset["adversarial"] = torch.cat(adversarial) if adversarial else self.subset["images"]
        self.subset_masks = {f"{MODEL}/{name}": torch.cat([m[name] for m in masks]) if masks else torch.empty(0)
                             for name in self.strong.input_names}
        results = metrics.compute()
        self.report.add(MODEL, results, self.strong.describe)
        return results["acc"] | {"clean (subset)": results["clean_acc"]}

    def _eps_accuracy(self, accuracy: dict[str, float]) -> tuple[list[float], dict[str, list[float]]]:
        eps = sorted({0.0, self.suite.eps, *self.suite.eps_sweep})
        kind = {0.0: "clean", self.suite.eps: "fgsm"} | {e: sweep_name(e) for e in self.suite.eps_sweep}
        curves = {"FGSM": [accuracy[kind[e]] for e in eps]}
        for defense in self.suite.defenses:
            curves[f"FGSM, {defense.name}"] = [accuracy[f"{kind[e]}/{defense.name}"] for e in eps]
        if self.strong is not None:
            suffix = {e: "" if e == self.suite.eps else f"_eps{e:.4f}" for e in eps}
            for attack, label in [("pgd", "PGD"), *[(a, f"worst case to {a.upper()}") for a in self.strong.ensemble[-1:]]]:
                curves[f"{label} (subset)"] = [accuracy["clean (subset)"]] + [
                    accuracy.get(f"{attack}{suffix[e]}", float("nan")) for e in eps[1:]]  # nan: not run, not drawn
        return eps, curves

    def main_sample(self) -> dict | None:
        """The image of the seed's figure: the requested index, or the first image of the requested
        class that the model gets right and FGSM flips, else the first image of that class."""
        candidates = [(not s["flipped"], index, s) for index, s in self.samples.items()
                      if index == self.sample or CLASSES[s["label"]] == self.sample]
        if not candidates:
            return None
        _, index, sample = min(candidates, key=lambda candidate: candidate[:2])
        return sample | {"index": index}

    def dashboard_hparams(self, pl_module: L.LightningModule) -> dict[str, object]:
        """The run's HPARAMS row: the recipe of the weights tested (from their checkpoint), then this study."""
        trained = getattr(pl_module, "trained_with", None) or {"hparams": dict(pl_module.hparams),
                                                                "epochs": pl_module.current_epoch, "batch_size": None}
        return training_hparams(**trained) | {
            "eps_test": self.suite.eps, "defenses": ", ".join(d.name for d in self.suite.defenses) or "none"}

    def figures(self) -> dict[str, Figure]:
        figures = {"accuracy_bars": accuracy_bars(self.report.details(), self.suite.eps),
                   "eps_curve": eps_curve(*self.eps_accuracy, MODEL)}
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
            rows = [(s["images"], s["probabilities"][MODEL], s["label"]) for _, s in sorted(by_class.items())]
            figures["samples_grid"] = sample_grid(rows, MODEL)
        return figures

    def _robust_masks(self, trainer: L.Trainer) -> pd.DataFrame:
        """Per subset image (test index, label): 1 if robust under each ``<model>/<input>``, from
        every rank; with it anyone can recompute (or combine) the strong attacks' numbers."""
        table = {"index": self.subset["index"].tolist(), "label": self.subset["labels"].tolist()}
        table |= {name: mask.int().tolist() for name, mask in self.subset_masks.items()}
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, table)
            table = {key: [value for part in gathered for value in part[key]] for key in table}
        return pd.DataFrame(table).sort_values("index")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write what every evaluation callback added; rank 0 only."""
        log_dir = Path(trainer.log_dir)  # a broadcast under DDP: every rank must ask for it
        masks = self._robust_masks(trainer) if self.strong is not None else None
        if not trainer.is_global_zero:
            return
        self.report.robust_masks = masks
        figures = self.figures()
        experiment = trainer.logger.experiment
        for name, figure in figures.items():
            experiment.add_figure(f"test/{name}", figure, global_step=trainer.global_step, close=False)
        self.report.stage_seconds = dict(self.suite.timer.seconds)
        for name, table in self.report.tables().items():
            experiment.add_text(f"test/{name}", table, global_step=trainer.global_step)
        headline = {tag: value for tag, (value, _) in self.report.headline().items() if tag != "test/acc"}
        trainer.logger.log_metrics(headline, step=trainer.global_step)  # test/acc: the LightningModule's
        weights = Path(trainer.ckpt_path).stem if trainer.ckpt_path else "untrained"
        trial = trial_name(weights, self.suite.eps, datetime.now())
        log_hparams(trainer.logger, self.dashboard_hparams(pl_module), trial)
        self.report.write(log_dir, figures)
        print(f"\nRobustness results in {log_dir / 'results.md'}\n\n"
              + self.report.summary_frame().to_string(index=False, float_format="{:.4f}".format))
