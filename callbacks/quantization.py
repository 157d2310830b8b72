"""QuantizationEvaluation: int8 copies of the tested model, attacked by transfer and white-box, defended again."""

import copy
from functools import partial

import lightning as L
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from callbacks.robustness import RobustnessEvaluation
from cifar_lightning.attacks import attack_chain
from cifar_lightning.data import load_cifar10
from cifar_lightning.errors import ConfigError
from cifar_lightning.evaluation import (
    RobustAccuracy,
    RobustnessMetrics,
    pgd_with_restarts,
    predict,
    predicted_labels,
)
from cifar_lightning.quantization import (
    cpu_latency,
    fake_quant_surrogate,
    quantize_dynamic_linear,
    quantize_static,
    state_dict_megabytes,
)


class QuantizationEvaluation(L.Callback):
    """During ``trainer.test``: evaluate int8 copies of the model on the CPU (their kernels are CPU
    only) on the very images ``RobustnessEvaluation`` made for the FP32 model — clean, FGSM
    (a transfer attack: int8 models have no gradients) and each defense — and add a summary row per
    model (size, accuracy, recovery, latency) to its report.

    Models: ``int8_dynamic`` (Linear layers → qint8 weights, dynamic activations; the seed's) and,
    with ``static``, ``int8_static`` (every layer int8, x86 backend, calibrated on training images).

    On the strong attacks' subset (when ``RobustnessEvaluation`` runs them): ``transfer``, the FP32
    model's worst-case images scored on the int8 model, and with ``whitebox`` a white-box PGD
    (the FP32 model's steps and restarts) on a fake-quantized surrogate of the int8 model
    (``quantization.fake_quant_surrogate``), scored on the real int8 model; both count an image
    robust only if the FGSM transfer did not fool it either. ``surrogate_agreement`` in the summary
    is how often the surrogate and the int8 model agree on the clean subset images.

    Args:
        static: also build and evaluate the static int8 model.
        calibration_images: training images that calibrate the static model's activation ranges.
        latency_batch_size: batch of the CPU latency measurement (same for every model).
        whitebox: run the white-box attack on each int8 model.
    """

    def __init__(self, static: bool = True, calibration_images: int = 512, latency_batch_size: int = 128,
                 whitebox: bool = True) -> None:
        for name, value in (("calibration_images", calibration_images), ("latency_batch_size", latency_batch_size)):
            if value < 1:
                raise ValueError(f"QuantizationEvaluation: {name}={value} must be >= 1")
        self.static, self.calibration_images, self.latency_batch_size = static, calibration_images, latency_batch_size
        self.whitebox = whitebox

    def _robustness(self, trainer: L.Trainer) -> RobustnessEvaluation:
        callbacks = trainer.callbacks
        found = [i for i, c in enumerate(callbacks) if isinstance(c, RobustnessEvaluation)]
        if not found or found[0] > callbacks.index(self):
            raise ConfigError("invalid configuration: QuantizationEvaluation reuses the images of RobustnessEvaluation. "
                              "Fix: list callbacks.robustness.RobustnessEvaluation before it in trainer.callbacks")
        return callbacks[found[0]]

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.robustness = self._robustness(trainer)
        fp32 = copy.deepcopy(pl_module.net).cpu().eval()
        with self.robustness.suite.timer("quantization"):
            self.models = {"int8_dynamic": quantize_dynamic_linear(fp32)}
            if self.static:
                images, _ = load_cifar10(trainer.datamodule.hparams.data_dir, train=True)
                self.models["int8_static"] = quantize_static(fp32, images[: self.calibration_images].float() / 255)
        # Every input kind but the ε sweep, which stays an FP32 study.
        self.input_names = [n for n in self.robustness.suite.input_names if not n.startswith("fgsm_eps")]
        self.metrics = {name: RobustnessMetrics(self.input_names, pl_module.device) for name in self.models}
        self.standing: dict[str, list[Tensor]] = {name: [] for name in self.models}  # per subset image
        report = self.robustness.report
        for name, model in {"fp32": fp32, **self.models}.items():
            with self.robustness.suite.timer("cpu latency runs"):
                latency = cpu_latency(model, batch_size=self.latency_batch_size)
            report.add_model_info(
                name, size_mb=state_dict_megabytes(model), cpu_ms_per_batch=latency["ms_per_batch"],
                cpu_images_per_s=latency["images_per_s"], cpu_threads=latency["threads"],
                eval_device=str(pl_module.device) if name == "fp32" else "cpu",
            )

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        labels = batch[1]
        inputs = {name: self.robustness.inputs[name].cpu() for name in self.input_names}
        reference = self.robustness.probabilities["clean"].argmax(dim=1)
        for name, model in self.models.items():
            with self.robustness.suite.timer(f"{name} model passes"):
                probabilities = predict(model, inputs)
            self.metrics[name].update({k: p.to(labels.device) for k, p in probabilities.items()}, labels, reference)
            if self.robustness.strong is not None:
                positions = self.robustness.subset_positions.cpu()
                right = {k: probabilities[k][positions].argmax(1) == labels[positions].cpu() for k in ("clean", "fgsm")}
                self.standing[name].append(right["clean"] & right["fgsm"])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        describe = self.robustness.suite.describe
        for name, metrics in self.metrics.items():
            self.robustness.report.add(name, metrics.compute(), describe)
            if self.robustness.strong is not None:
                self._subset_attacks(trainer, pl_module, name)
        for sample in self.robustness.samples.values():  # the figures show every model's predictions
            batch = {kind: image[None] for kind, image in sample["images"].items()}
            for name, model in self.models.items():
                sample["probabilities"][name] = {k: p[0] for k, p in predict(model, batch).items()}

    def _subset_attacks(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        """Transfer and white-box attacks on the int8 model ``name``, on this rank's share of the subset."""
        model, strong, subset = self.models[name], self.robustness.strong, self.robustness.subset
        standing = torch.cat(self.standing[name]) if self.standing[name] else torch.empty(0, dtype=torch.bool)
        judge = partial(predicted_labels, model)
        surrogate = fake_quant_surrogate(model) if self.whitebox else None
        inputs = ["transfer", "whitebox"] if self.whitebox else ["transfer"]
        metrics = RobustAccuracy(inputs, pl_module.device)
        agreement = MulticlassAccuracy(10, average="micro").to(pl_module.device)
        masks = {input_name: [] for input_name in inputs}
        timer = self.robustness.suite.timer
        for part in self.robustness.subset_batches(trainer, f"{name} attacks"):
            images, labels = subset["images"][part].cpu(), subset["labels"][part].cpu()
            robust = {"clean": judge(images) == labels}
            with timer(f"{name} transfer"):
                robust["transfer"] = standing[part] & (judge(subset["adversarial"][part].cpu()) == labels)
            if surrogate is not None:
                with timer(f"{name} white-box"):
                    attack = pgd_with_restarts(surrogate, strong.eps, strong.pgd_steps, strong.pgd_restarts,
                                               strong.seed, judge=judge)
                    robust["whitebox"] = attack_chain({"whitebox": attack}, judge, images, labels,
                                                      standing[part])[1]["whitebox"]
                agreement.update(predicted_labels(surrogate, images).to(pl_module.device), judge(images).to(pl_module.device))
            metrics.update({k: v.to(pl_module.device) for k, v in robust.items()})
            for input_name in inputs:
                masks[input_name].append(robust[input_name])
        self.robustness.report.add(name, metrics.compute(), strong.describe)
        if surrogate is not None:
            self.robustness.report.add_model_info(name, surrogate_agreement=agreement.compute().item())
        self.robustness.subset_masks |= {f"{name}/{k}": torch.cat(v) if v else torch.empty(0) for k, v in masks.items()}
