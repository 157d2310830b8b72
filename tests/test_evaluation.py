"""The per-batch evaluation as plain functions: metrics arithmetic and the attack suite."""

import math

import pytest
import torch
from torch import nn

from cifar_lightning.defenses import JpegCompression, MedianFilter
from cifar_lightning.evaluation import (
    AttackSuccessRate,
    AttackSuite,
    InputKind,
    ModelUnderTest,
    RobustAccuracy,
    RobustnessMetrics,
    StageTimer,
    StrongAttacks,
    fgsm_kind,
    stratified_subset,
)
from cifar_lightning.study import Study


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
    jpeg = JpegCompression(30)
    kinds = [InputKind(), fgsm_kind(0.03), fgsm_kind(0.03).defended(jpeg), InputKind().defended(jpeg)]
    metrics = RobustnessMetrics(kinds, torch.device("cpu"))
    target = torch.tensor([0, 1, 2, 3])
    metrics.update(
        {"clean": torch.tensor([0, 1, 2, 0]), "fgsm": torch.tensor([5, 5, 2, 0]),
         "fgsm/jpeg_q30": torch.tensor([0, 5, 2, 3]), "clean/jpeg_q30": torch.tensor([0, 1, 2, 3])},
        target, reference=torch.tensor([0, 1, 9, 9]),
    )
    results = metrics.compute()
    assert results["acc"] == {"clean": 0.75, "fgsm": 0.25, "fgsm/jpeg_q30": 0.75, "clean/jpeg_q30": 1.0}
    assert results["attack_success"] == {"fgsm": pytest.approx(2 / 3), "fgsm/jpeg_q30": pytest.approx(1 / 3)}
    assert results["agreement"] == 0.5 and results["images"] == 4
    assert results["acc_class"]["clean"]["airplane"] == 1.0 and results["acc_class"]["clean"]["cat"] == 0.0


def test_suite_makes_each_input_kind_once_and_describes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    suite = AttackSuite(0.03, [JpegCompression(30), MedianFilter(3)], eps_sweep=[2 / 255])
    images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    timer = StageTimer()
    inputs = suite(model, images, labels, timer)
    kinds = {kind.name: kind for kind in suite.kinds}
    assert set(inputs) == set(kinds)
    assert {"fgsm_eps0.0078/median_k3", "clean/jpeg_q30"} <= set(inputs)
    assert (inputs["fgsm"] - images).abs().max() <= 0.03 + 1e-6
    torch.testing.assert_close(inputs["fgsm/jpeg_q30"], JpegCompression(30)(inputs["fgsm"]))
    assert kinds["fgsm/jpeg_q30"].row() == {"input": "fgsm/jpeg_q30", "attack": "FGSM", "norm": "Linf", "eps": 0.03,
                                            "steps": 1, "restarts": 1, "defense": "jpeg_q30", "threat": "non-adaptive",
                                            "corruption": "none", "severity": 0}
    assert kinds["fgsm_eps0.0078"].eps == 2 / 255  # exact: the name rounds, the value does not
    assert kinds["clean"].threat == "none" and not kinds["clean/jpeg_q30"].attacked
    assert set(timer.seconds) >= {"fgsm", "defense jpeg_q30"}


def test_the_subset_is_stratified_seeded_and_sorted():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    subset = stratified_subset(labels, 103, seed=0)
    assert len(subset) == 103 and subset.unique().numel() == 103 and torch.equal(subset, subset.sort().values)
    counts = labels[subset].bincount(minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(subset, stratified_subset(labels, 103, seed=0))
    assert not torch.equal(subset, stratified_subset(labels, 103, seed=1))
    assert torch.equal(stratified_subset(labels, None), torch.arange(500))


def test_strong_attacks_describe_their_rows_and_start_where_fgsm_left_off():
    median = MedianFilter(3)
    strong = StrongAttacks(0.03, [median], eps_sweep=[2 / 255], pgd_steps=5, ensemble=["apgd-ce"])
    kinds = {kind.name: kind for kind in strong.kinds}
    assert list(kinds) == ["pgd", "apgd-ce", "pgd_eps0.0078", "adaptive/median_k3"]
    assert kinds["apgd-ce"].worst_of == ("fgsm", "pgd", "apgd-ce") and kinds["apgd-ce"].steps == 100
    assert kinds["adaptive/median_k3"].threat == "adaptive" and kinds["adaptive/median_k3"].defense == "median_k3"
    assert (kinds["pgd_eps0.0078"].steps, kinds["pgd_eps0.0078"].eps) == (5, 2 / 255)
    l2 = StrongAttacks(0.03, [], pgd_steps=5, ensemble=["apgd-ce"], l2_eps=0.5).l2_chain()
    assert [(kind.name, kind.norm, kind.eps) for kind in l2] == [("l2.fgm", "L2", 0.5), ("l2.pgd", "L2", 0.5),
                                                                  ("l2.apgd-ce", "L2", 0.5)]
    assert l2[-1].worst_of == ("fgm", "pgd", "apgd-ce") and l2[-1].row()["norm"] == "L2"
    assert "l2.pgd" not in kinds  # L2 only when asked for
    transfer, whitebox = strong.without_gradients_kinds(surrogate=True)
    assert (transfer.name, transfer.worst_of, whitebox.name) == ("transfer", ("fgsm", "pgd", "apgd-ce"), "whitebox")
    suite = AttackSuite(0.03, [median], eps_sweep=[2 / 255])
    target = torch.tensor([0, 1, 2, 3])
    standing = suite.standing({"clean": _one_hot([0, 1, 2, 9]), "fgsm": _one_hot([0, 5, 2, 3]),
                               "fgsm_eps0.0078": _one_hot([0, 1, 2, 3]), "clean/median_k3": _one_hot([0, 1, 9, 3]),
                               "fgsm/median_k3": _one_hot([0, 1, 2, 3])}, target)
    assert standing["fgsm"].tolist() == [True, False, True, False]  # right when clean and after FGSM
    assert standing["fgsm_eps0.0078"].tolist() == [True, True, True, False]
    assert standing["fgsm/median_k3"].tolist() == [True, True, False, True]


def test_robust_accuracy_from_masks():
    metric = RobustAccuracy([InputKind("pgd", 0.03, threat="white-box")], torch.device("cpu"))
    metric.update({"clean": torch.tensor([True, True, False, True]), "pgd": torch.tensor([True, False, False, False])})
    results = metric.compute()
    assert results["acc"] == {"pgd": 0.25} and results["images"] == 4 and results["clean_acc"] == 0.75
    assert results["attack_success"]["pgd"] == pytest.approx(2 / 3)


class _Counting(nn.Module):
    """A small classifier that counts the images it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return self.net(x)


class _CountingJpeg(JpegCompression):
    images = 0

    def process_batch(self, images):
        type(self).images += len(images)
        return super().process_batch(images)


@pytest.mark.parametrize("from_test_step", [True, False], ids=["clean logits given", "computed"])
def test_the_study_passes_each_image_through_each_model_once(from_test_step):
    """One gradient pass for FGSM at every budget, one evaluation pass per input kind (the clean one
    taken from test_step when it has it), and each defense once per distinct image."""
    torch.manual_seed(0)
    model, defense = _Counting().eval(), _CountingJpeg(30)
    study = Study(ModelUnderTest("fp32", model, torch.device("cpu")), latency_batch_size=2)
    study.set_attacks(AttackSuite(0.03, [defense], eps_sweep=[2 / 255, 4 / 255]), strong=None)
    images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    study.begin(labels, batch_size=6, device=torch.device("cpu"))
    model.images = _CountingJpeg.images = 0
    with torch.inference_mode():
        logits = model(images) if from_test_step else None
        model.images = 0
        study.update(images, labels, list(range(6)), logits)
    kinds = study.kinds(study.primary)  # clean, 3 FGSM budgets, each of those 4 defended: 8
    assert len(kinds) == 8
    assert model.images == 6 * (1 + len(kinds) - from_test_step)  # one gradient pass, then each kind once
    assert _CountingJpeg.images == 6 * 4  # the clean batch and each of the 3 FGSM batches
