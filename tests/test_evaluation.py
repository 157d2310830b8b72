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
    assert results["agreement"] == 0.5 and results["images"] == dict.fromkeys(results["acc"], 4)
    assert results["acc_class"]["clean"]["airplane"] == 1.0 and results["acc_class"]["clean"]["cat"] == 0.0


def test_metrics_of_a_kind_scored_on_the_subset_count_the_subset_alone():
    sweep = fgsm_kind(2 / 255, sweep=True)
    metrics = RobustnessMetrics([InputKind(), fgsm_kind(0.03), sweep], torch.device("cpu"), on_subset=[sweep.name])
    target, subset = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2])
    metrics.update({"clean": torch.tensor([0, 1, 2, 0]), "fgsm": torch.tensor([5, 5, 2, 0]),
                    sweep.name: torch.tensor([1, 7])}, target, subset=subset)  # images 1 and 2: right, wrong
    no_image = torch.empty(0, dtype=torch.long)  # a batch with none of the subset's images
    metrics.update({"clean": torch.tensor([4]), "fgsm": torch.tensor([4]), sweep.name: no_image}, torch.tensor([4]),
                   subset=no_image)
    results = metrics.compute()
    assert results["images"] == {"clean": 5, "fgsm": 5, sweep.name: 2}
    assert results["acc"] == {"clean": pytest.approx(0.8), "fgsm": pytest.approx(0.4), sweep.name: 0.5}
    assert results["attack_success"][sweep.name] == 0.5  # both right when clean, one flipped


def test_suite_makes_each_input_kind_once_and_describes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    suite = AttackSuite(0.03, [JpegCompression(30), MedianFilter(3)], eps_sweep=[2 / 255])
    images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    timer = StageTimer()
    inputs = suite(model, images, labels, timer, subset=torch.tensor([1, 4]))
    kinds = {kind.name: kind for kind in suite.kinds}
    assert {len(batch) for batch in inputs.values()} == {6}  # the sweep on every image: the subset unused
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


def test_the_sweep_on_the_subset_makes_the_same_images_for_those_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    images, labels, subset = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,)), torch.tensor([1, 4])
    everywhere = AttackSuite(0.03, [MedianFilter(3)], eps_sweep=[2 / 255])(model, images, labels, StageTimer(), subset)
    suite = AttackSuite(0.03, [MedianFilter(3)], eps_sweep=[2 / 255], sweep_on_subset=True)
    inputs = suite(model, images, labels, StageTimer(), subset)
    assert [kind.name for kind in suite.kinds if suite.on_subset(kind)] == ["fgsm_eps0.0078", "fgsm_eps0.0078/median_k3"]
    for kind in suite.kinds:
        expected = everywhere[kind.name][subset] if suite.on_subset(kind) else everywhere[kind.name]
        assert torch.equal(inputs[kind.name], expected), kind.name


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
    found = {"clean": _one_hot([0, 1, 2, 9]), "fgsm": _one_hot([0, 5, 2, 3]), "fgsm_eps0.0078": _one_hot([0, 1, 2, 3]),
             "clean/median_k3": _one_hot([0, 1, 9, 3]), "fgsm/median_k3": _one_hot([0, 1, 2, 3])}
    standing = suite.standing(found, target, subset=torch.arange(4))
    assert standing["fgsm"].tolist() == [True, False, True, False]  # right when clean and after FGSM
    assert standing["fgsm_eps0.0078"].tolist() == [True, True, True, False]
    assert standing["fgsm/median_k3"].tolist() == [True, True, False, True]
    # Where the subset's images stand, from predictions of every image or, for the sweep on the subset, of those.
    on_subset = AttackSuite(0.03, [median], eps_sweep=[2 / 255], sweep_on_subset=True)
    subset = torch.tensor([1, 3])
    standing = on_subset.standing(found | {"fgsm_eps0.0078": _one_hot([1, 3])}, target, subset)
    assert {name: mask.tolist() for name, mask in standing.items()} == {
        "clean": [True, False], "fgsm": [False, False], "fgsm_eps0.0078": [True, False], "fgsm/median_k3": [True, True]}


def test_robust_accuracy_from_masks():
    metric = RobustAccuracy([InputKind("pgd", 0.03, threat="white-box")], torch.device("cpu"))
    metric.update({"clean": torch.tensor([True, True, False, True]), "pgd": torch.tensor([True, False, False, False])})
    results = metric.compute()
    assert results["acc"] == {"pgd": 0.25} and results["images"] == {"pgd": 4} and results["clean_acc"] == 0.75
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
@pytest.mark.parametrize("sweep_on_subset", [False, True], ids=["sweep everywhere", "sweep on the subset"])
def test_the_study_passes_each_image_through_each_model_once(from_test_step, sweep_on_subset):
    """One gradient pass for FGSM at every budget, one evaluation pass per input kind (the clean one
    taken from test_step when it has it), and each defense once per distinct image; the sweep's
    kinds on the subset's images alone when asked."""
    torch.manual_seed(0)
    model, defense = _Counting().eval(), _CountingJpeg(30)
    study = Study(ModelUnderTest("fp32", model, torch.device("cpu")), latency_batch_size=2)
    study.set_attacks(AttackSuite(0.03, [defense], eps_sweep=[2 / 255, 4 / 255], sweep_on_subset=sweep_on_subset),
                      strong=None, subset=2)
    images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    study.begin(labels, batch_size=6, device=torch.device("cpu"))
    swept = 2 if sweep_on_subset else 6  # images of each sweep kind
    model.images = _CountingJpeg.images = 0
    with torch.inference_mode():
        logits = model(images) if from_test_step else None
        model.images = 0
        study.update(images, labels, list(range(6)), logits)
    kinds = study.kinds(study.primary)  # clean, 3 FGSM budgets, each of those 4 defended: 8
    assert len(kinds) == 8
    # One gradient pass, then each kind once: clean, FGSM and their JPEG on 6 images; 2 budgets, with JPEG, swept.
    assert model.images == 6 * (1 + 4 - from_test_step) + swept * 4
    assert _CountingJpeg.images == 6 * 2 + swept * 2  # the clean and FGSM batches, then the 2 swept ones
