"""The per-batch evaluation as plain functions: metrics arithmetic and the attack suite."""

import math

import pytest
import torch
from torch import nn

from cifar_lightning.defenses import JpegCompression, MedianFilter
from cifar_lightning.evaluation import AttackSuccessRate, AttackSuite, RobustnessMetrics, predict, scalar_tags


def test_attack_success_counts_only_images_that_were_right_when_clean():
    metric = AttackSuccessRate()
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    clean = torch.tensor([0, 1, 2, 3, 9, 9])  # 4 correct
    attacked = torch.tensor([0, 7, 7, 3, 4, 9])  # flips 2 of them; image 4 "recovers", not a success
    metric.update(clean, attacked, target)
    assert metric.compute().item() == pytest.approx(2 / 4)
    metric.update(torch.tensor([1]), torch.tensor([2]), torch.tensor([1]))  # one more right, flipped
    assert metric.compute().item() == pytest.approx(3 / 5)


def test_attack_success_is_nan_when_nothing_was_right():
    metric = AttackSuccessRate()
    metric.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([0]))
    assert math.isnan(metric.compute().item())


def _one_hot(preds, classes=10):
    return nn.functional.one_hot(torch.tensor(preds), classes).float()


def test_metrics_on_known_predictions():
    metrics = RobustnessMetrics(["clean", "fgsm", "fgsm/jpeg_q30", "clean/jpeg_q30"], torch.device("cpu"))
    target = torch.tensor([0, 1, 2, 3])
    metrics.update(
        {"clean": _one_hot([0, 1, 2, 0]), "fgsm": _one_hot([5, 5, 2, 0]),
         "fgsm/jpeg_q30": _one_hot([0, 5, 2, 3]), "clean/jpeg_q30": _one_hot([0, 1, 2, 3])},
        target, reference=torch.tensor([0, 1, 9, 9]),
    )
    results = metrics.compute()
    assert results["acc"] == {"clean": 0.75, "fgsm": 0.25, "fgsm/jpeg_q30": 0.75, "clean/jpeg_q30": 1.0}
    assert results["attack_success"] == {"fgsm": pytest.approx(2 / 3), "fgsm/jpeg_q30": pytest.approx(1 / 3)}
    assert results["agreement"] == 0.5 and results["images"] == 4
    assert results["acc_class"]["clean"]["airplane"] == 1.0 and results["acc_class"]["clean"]["cat"] == 0.0
    tags = scalar_tags(results)
    assert tags["fgsm/jpeg_q30/acc"] == 0.75 and tags["clean/acc_class/cat"] == 0.0


def test_suite_makes_each_input_kind_once_and_describes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    suite = AttackSuite(0.03, [JpegCompression(30), MedianFilter(3)], eps_sweep=[2 / 255], pgd_steps=2, bpda=True)
    images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    inputs = suite(model, images, labels)
    assert set(inputs) == set(suite.input_names)
    assert {"fgsm_eps0.0078/median_k3", "pgd", "bpda/jpeg_q30"} <= set(inputs)
    assert (inputs["fgsm"] - images).abs().max() <= 0.03 + 1e-6
    torch.testing.assert_close(inputs["fgsm/jpeg_q30"], JpegCompression(30)(inputs["fgsm"]))
    assert suite.describe("fgsm/jpeg_q30") == {"attack": "FGSM", "eps": 0.03, "defense": "jpeg_q30", "adaptive": False}
    assert suite.describe("fgsm_eps0.0078") == {"attack": "FGSM", "eps": 0.0078, "defense": "none", "adaptive": False}
    assert suite.describe("bpda/median_k3")["adaptive"]
    assert set(suite.timer.seconds) >= {"fgsm", "defense jpeg_q30", "pgd", "bpda median_k3"}
    probabilities = predict(model, inputs)
    assert probabilities["clean"].shape == (6, 10)
    torch.testing.assert_close(probabilities["clean"].sum(1), torch.ones(6))
