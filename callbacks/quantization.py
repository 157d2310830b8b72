"""QuantizationEvaluation: int8 copies of the tested model, as models under test of the run's study."""

from pathlib import Path

import lightning as L
import torch

from callbacks.study import StudyCallback
from cifar_lightning.data import load_cifar10
from cifar_lightning.errors import ConfigError
from cifar_lightning.evaluation import ModelUnderTest
from cifar_lightning.frozen import joint_pass
from cifar_lightning.quantization import (
    QuantizationError,
    check_quantizable,
    fake_quant_surrogate,
    quantize_dynamic_linear,
    quantize_static,
)
from cifar_lightning.study import Study


class QuantizationEvaluation(StudyCallback):
    """During ``trainer.test``: int8 copies of the study's first model (the FP32 network), on the CPU
    (their kernels are CPU only), scored on the very images the study makes for it — clean, FGSM
    (a transfer attack: int8 models have no gradients) and each defense — with a summary row per
    model (size, accuracy, recovery, latency, agreement with FP32).

    Models: ``int8_dynamic`` (Linear layers → qint8 weights, dynamic activations; the seed's) and,
    with ``static``, ``int8_static`` (every layer int8, x86 backend, calibrated on training images).
    A model the quantizer cannot take (a TorchScript or ``torch.export`` program, say) gets a note
    in the results instead, and the study goes on.

    On the strong attacks' subset: ``transfer``, the FP32 model's worst-case images scored on the
    int8 model, and with ``whitebox`` a white-box PGD (the FP32 model's steps and restarts) on a
    fake-quantized surrogate of the int8 model (``quantization.fake_quant_surrogate``), scored on the
    real int8 model; both count an image robust only if the FGSM transfer did not fool it either.
    ``surrogate_agreement`` in the summary is how often the surrogate and the int8 model agree on
    the clean subset images.

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

    def contribute(self, study: Study, trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> None:
        self.add_int8_copies(study, trainer.datamodule.hparams.data_dir)

    def add_int8_copies(self, study: Study, data_dir: str | Path) -> None:
        """Add the int8 copies of ``study``'s first model, calibrated on the training images in ``data_dir``."""
        study.latency_batch_size = self.latency_batch_size
        calibration = None
        if self.static:
            images, _ = load_cifar10(data_dir, train=True)
            # Before the first test batch: a run that calibrated on fewer images than its config says would mislead.
            if self.calibration_images > len(images):
                raise ConfigError(f"invalid configuration: QuantizationEvaluation: calibration_images="
                                  f"{self.calibration_images} is more than the {len(images)} training images in "
                                  f"{data_dir}. Fix: calibration_images of at most {len(images)}, e.g. "
                                  f"{min(512, len(images))}.")
            calibration = images[: self.calibration_images].float() / 255
        model = study.primary.model
        with study.timer("quantization"):
            try:
                check_quantizable(model)
            except QuantizationError as err:
                study.note(f"no int8 copies: {err}")
                return
            copies = {"int8_dynamic": quantize_dynamic_linear(model)}
            if calibration is not None:
                try:
                    copies["int8_static"] = quantize_static(model, calibration)
                except QuantizationError as err:
                    study.note(f"no int8_static copy: {err}")
            for name, copied in copies.items():
                surrogate = fake_quant_surrogate(copied) if self.whitebox else None
                # The dynamic copy runs the FP32 layers before its Linear ones: one pass scores both models.
                joint = joint_pass(model, copied) if study.primary.device.type == "cpu" else None
                study.add_model(ModelUnderTest(name, copied, torch.device("cpu"), gradients=False, surrogate=surrogate,
                                               sweep=False, joint=joint))
