"""CorruptionEvaluation: the common corruptions of CIFAR-10-C, scored on every model under test."""

import lightning as L

from callbacks.study import StudyCallback
from cifar_lightning.corruptions import CORRUPTIONS, SEVERITIES
from cifar_lightning.evaluation import CorruptionSuite
from cifar_lightning.study import Study


class CorruptionEvaluation(StudyCallback):
    """During ``trainer.test``: the 15 common corruptions of CIFAR-10-C (Hendrycks & Dietterich 2019;
    noise, blur, weather, digital; ``cifar_lightning.corruptions``) at 5 severities, with the published
    CIFAR-10 parameters, generated from ``seed`` on a seeded, class-stratified subset of the test
    images, and scored on every model under test of the run's study, the int8 copies too.

    Rows ``corruption.<name>_s<severity>`` and ``corruption.clean`` (the subset uncorrupted) in
    ``results.csv`` (columns ``corruption``, ``severity``); in the summary each model's
    ``corruption_acc`` (the mean over every corruption and severity) and, for the int8 copies, their
    mCE and relative mCE against the FP32 model; ``test/corruption_acc`` in TensorBoard.

    Args:
        corruptions: names from the 15 (all by default).
        severities: from 1 to 5 (all by default).
        images: the subset's size (1,000: 75,000 corrupted images with every corruption and severity);
            null for all 10,000 test images.
        seed: seed of the subset and of every random draw of the corruptions.
    """

    def __init__(self, corruptions: list[str] = CORRUPTIONS, severities: list[int] = SEVERITIES,
                 images: int | None = 1000, seed: int = 0) -> None:
        self.suite = CorruptionSuite(corruptions, severities, images, seed, owner="CorruptionEvaluation")

    def contribute(self, study: Study, trainer: L.Trainer | None = None, pl_module: L.LightningModule | None = None) -> None:
        study.set_corruptions(self.suite)
