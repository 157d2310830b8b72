"""RobustnessEvaluation: FGSM and the image-processing defenses over the whole test set."""

from pathlib import Path

import lightning as L
import torch.distributed as dist
from matplotlib.figure import Figure
from torch import Tensor

from cifar_lightning.data import CLASSES
from cifar_lightning.defenses import Defense, default_defenses
from cifar_lightning.evaluation import AttackSuite, RobustnessMetrics, predict, scalar_tags, sweep_name
from cifar_lightning.report import Report, eps_curve, prediction_figure, sample_grid

MODEL = "fp32"


class RobustnessEvaluation(L.Callback):
    """During ``trainer.test``: attack every test batch with FGSM, apply each defense to the clean
    and the attacked images, and log accuracy, attack success and figures under ``test/fp32/…``.

    Also writes ``results.csv``, ``summary.csv``, ``results.md`` and the figures as PNG into the
    run folder (rank 0). Other callbacks (``QuantizationEvaluation``) reuse the images it makes
    for each batch (``self.inputs``) and add their rows to ``self.report`` before it is written.

    Args:
        eps: FGSM budget in [0, 1] pixel space.
        defenses: defenses to evaluate; the seed's four (Gaussian k3, JPEG q30, median k3, TV 0.1)
            by default.
        eps_sweep: further FGSM budgets for the accuracy-vs-ε curve (with and without defenses).
        pgd_steps: steps of a PGD reference attack at ``eps``; 0 turns it off.
        bpda: also run the adaptive BPDA-FGSM attack on each defense.
        sample: the image of the seed's figure: a test-set index, or a class name for the first
            test image of that class that the model gets right and FGSM flips.
    """

    def __init__(
        self,
        eps: float = 0.03,
        defenses: list[Defense] | None = None,
        eps_sweep: list[float] = (1 / 255, 2 / 255, 4 / 255, 16 / 255),
        pgd_steps: int = 0,
        bpda: bool = False,
        sample: str | int = "ship",
    ) -> None:
        for name, value in [("eps", eps)] + [("eps_sweep", e) for e in eps_sweep]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RobustnessEvaluation: {name}={value} must be in [0, 1] (pixel scale), e.g. 0.03")
        if pgd_steps < 0:
            raise ValueError(f"RobustnessEvaluation: pgd_steps={pgd_steps} must be >= 0 (0 turns PGD off)")
        if isinstance(sample, str) and sample not in CLASSES:
            raise ValueError(f"RobustnessEvaluation: sample={sample!r} must be a test index or one of {CLASSES}")
        self.suite = AttackSuite(eps, default_defenses() if defenses is None else defenses,
                                 sorted(set(eps_sweep) - {0.0, eps}), pgd_steps, bpda)
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

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        images, labels = batch
        self.inputs = self.suite(pl_module, images, labels)
        with self.suite.timer("fp32 model passes"):
            self.probabilities = predict(pl_module.net, self.inputs)
        self.metrics.update(self.probabilities, labels)
        start = batch_idx * self._batch_size
        self._keep_samples(self._indices[start:start + len(labels)], labels)

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
        trainer.logger.log_metrics({f"test/{MODEL}/{k}": v for k, v in scalar_tags(results).items()},
                                   step=trainer.global_step)
        self.report.add(MODEL, results, self.suite.describe)
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, self.samples)
            self.samples = {index: s for part in gathered for index, s in part.items()}
        self.samples = dict(sorted(self.samples.items()))
        self.eps_accuracy = self._eps_accuracy(results["acc"])

    def _eps_accuracy(self, accuracy: dict[str, float]) -> tuple[list[float], dict[str, list[float]]]:
        eps = sorted({0.0, self.suite.eps, *self.suite.eps_sweep})
        kind = {0.0: "clean", self.suite.eps: "fgsm"} | {e: sweep_name(e) for e in self.suite.eps_sweep}
        curves = {"none": [accuracy[kind[e]] for e in eps]}
        for defense in self.suite.defenses:
            curves[defense.name] = [accuracy[f"{kind[e]}/{defense.name}"] for e in eps]
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

    def figures(self) -> dict[str, Figure]:
        figures = {"eps_curve": eps_curve(*self.eps_accuracy, MODEL)}
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

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write what every evaluation callback added; rank 0 only."""
        log_dir = Path(trainer.log_dir)  # a broadcast under DDP: every rank must ask for it
        if not trainer.is_global_zero:
            return
        figures = self.figures()
        experiment = trainer.logger.experiment
        for name, figure in figures.items():
            experiment.add_figure(f"test/{name}", figure, global_step=trainer.global_step, close=False)
        self.report.stage_seconds = dict(self.suite.timer.seconds)
        experiment.add_text("test/results", self.report.markdown(), global_step=trainer.global_step)
        # The summary as hparams metrics, so that runs compare side by side in the HPARAMS tab.
        trainer.logger.log_hyperparams(pl_module.hparams, self.report.hparams_metrics())
        self.report.write(log_dir, figures)
        print(f"\nRobustness results in {log_dir / 'results.md'}\n\n"
              + self.report.summary_frame().to_string(index=False, float_format="{:.4f}".format))
