"""``evaluate``: the test-time study of any CIFAR-10 classifier, from Python, without a Trainer.

    from cifar_lightning import evaluate
    results = evaluate(model, data_dir="../shared/cifar10", eps=8 / 255)
    results.summary, results.results, results.per_class, results.robust_masks   # pandas DataFrames

It runs the study that ``cifar-lightning test`` runs (the same callbacks' settings and defaults,
the same batches) and writes the same run folder: ``results.csv``, ``summary.csv``, … and the
TensorBoard events in ``<runs_dir>/version_N/``.
"""

import copy
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from tqdm.auto import tqdm

from callbacks.corruptions import CorruptionEvaluation
from callbacks.quantization import QuantizationEvaluation
from callbacks.robustness import RobustnessEvaluation
from cifar_lightning.dashboard import UNKNOWN_RECIPE, trial_name
from cifar_lightning.data import CLASSES, load_cifar10
from cifar_lightning.evaluation import ModelUnderTest
from cifar_lightning.frozen import frozen_copy
from cifar_lightning.model_card import About
from cifar_lightning.models import CIFAR10_NORMALIZATION, check_normalization, pixel_input
from cifar_lightning.study import Study, publish


@dataclass
class StudyResults:
    """The tables of a study, as written into ``run_dir``."""

    summary: pd.DataFrame  # one row per model under test (summary.csv)
    results: pd.DataFrame  # one row per (model, input kind) (results.csv)
    per_class: pd.DataFrame  # accuracy per class (per_class.csv)
    robust_masks: pd.DataFrame | None  # per subset image and strong attack: 1 if robust (robust_masks.csv)
    stage_times: pd.DataFrame  # wall seconds per stage (results.md)
    run_dir: Path


def evaluate(model: nn.Module, data_dir: str | Path = "data", *, normalization: dict | None = CIFAR10_NORMALIZATION,
             quantization: bool | dict = True, corruptions: bool | dict = True, images: int | None = None,
             batch_size: int = 128,
             device: str | torch.device = "cpu", runs_dir: str | Path = "lightning_logs", name: str = "model",
             progress: bool = True, fast: bool = True, **study: object) -> StudyResults:
    """The robustness study of ``model`` on the CIFAR-10 test images in ``data_dir``.

    Args:
        model: a classifier, images (N, 3, 32, 32) → 10 logits; it is copied, never changed.
        data_dir: ``test.npz``/``train.npz`` (or torchvision's files), as ``--data.data_dir``.
        normalization: the ``mean`` and ``std`` ``model`` expects its input normalised with (CIFAR-10's
            by default, as ImprovedCNN), or None for a model that takes [0, 1] pixels. Attacks and
            defenses always work on [0, 1] pixels.
        quantization: add the int8 copies (``QuantizationEvaluation``; a dict: its arguments).
        corruptions: score the common corruptions (``CorruptionEvaluation``; a dict: its arguments).
        images: the first this many test images (None: all 10,000).
        batch_size: images per batch (the CLI's ``--data.batch_size``; random starts are drawn per batch).
        device: where ``model`` runs.
        runs_dir: the run folder is a new ``version_N`` in it.
        name: the weights' name in TensorBoard's HPARAMS row.
        progress: progress bars.
        fast: run the study on a frozen copy of ``model`` with BatchNorm folded into the convolutions
            (``frozen.frozen_copy``: the same predictions, faster); false: on ``model`` as it is.
        **study: ``RobustnessEvaluation``'s arguments (``eps``, ``defenses``, ``eps_sweep``, ``strong_attacks``,
            ``subset``, ``pgd_steps``, ``pgd_restarts``, ``ensemble``, ``adaptive``, ``seed``, ``sample``…).
    """
    robustness = RobustnessEvaluation(**study)
    check_normalization(normalization, "evaluate")
    device = torch.device(device)
    network = pixel_input(copy.deepcopy(model), normalization).to(device, memory_format=torch.channels_last).eval()
    network = frozen_copy(network) if fast else network
    with torch.no_grad():
        logits = network(torch.zeros(1, 3, 32, 32, device=device))
    if logits.shape != (1, len(CLASSES)):
        raise ValueError(f"evaluate: the model returns {tuple(logits.shape)} for a (1, 3, 32, 32) image, not "
                         f"(1, {len(CLASSES)}) logits. Fix: pass a classifier with {len(CLASSES)} outputs, one per "
                         f"CIFAR-10 class.")
    test_images, test_labels = load_cifar10(data_dir, train=False)
    test_images, test_labels = test_images[:images], test_labels[:images]

    run = Study(ModelUnderTest("fp32", network, device))
    robustness.contribute(run)
    if corruptions:
        CorruptionEvaluation(**(corruptions if isinstance(corruptions, dict) else {})).contribute(run)
    if quantization:
        QuantizationEvaluation(**(quantization if isinstance(quantization, dict) else {})).add_int8_copies(run, data_dir)
    run.begin(test_labels, batch_size, device)
    with torch.inference_mode():  # as trainer.test
        for start in tqdm(range(0, len(test_labels), batch_size), desc="test batches", disable=not progress):
            batch = slice(start, start + batch_size)
            run.update(test_images[batch].to(device).float().div(255), test_labels[batch].to(device),
                       list(range(start, start + len(test_labels[batch]))))
    run.finish(progress=progress)

    logger = TensorBoardLogger(runs_dir, name="", default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    figures, masks = run.figures(), run.robust_masks()
    publish(run, logger, 0, figures, UNKNOWN_RECIPE | run.hparams(), trial_name(name, run.eps or 0.0, datetime.now()))
    logger.finalize("success")
    run.write(run_dir, figures, masks, About(name, type(model).__name__, **UNKNOWN_RECIPE))
    report = run.report
    return StudyResults(report.summary_frame(), report.details(), report.per_class_frame(), masks,
                        report.timings_frame(), run_dir)
