"""AutoAttack as published: the members' settings equal the official implementation's, the standard
version runs its four members in order from the clean images, and its number reaches RobustBench's format."""

import json

import pytest
import torch
from torch import nn

from callbacks.robustness import RobustnessEvaluation
from cifar_lightning import evaluation
from cifar_lightning.attacks import ensemble_member
from cifar_lightning.evaluation import CLEAN, CorruptionSuite, StrongAttacks, fgsm_kind
from cifar_lightning.model_card import About, corruptions_entry, model_card, robustbench_entry
from cifar_lightning.report import Report

# The official AutoAttack's standard version (github fra31/auto-attack, autoattack.py and set_version):
# facts of the reference, written out so that a change of torchattacks' defaults cannot move them
# (torchattacks names the official rho thr_decr).
OFFICIAL = {
    "apgd-ce": {"steps": 100, "n_restarts": 1, "loss": "ce", "thr_decr": 0.75, "eot_iter": 1},
    "apgd-t": {"steps": 100, "n_restarts": 1, "n_target_classes": 9, "thr_decr": 0.75, "eot_iter": 1},
    "fab-t": {"steps": 100, "n_restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9, "multi_targeted": True,
              "n_target_classes": 9},
    "square": {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8, "loss": "margin", "rescale_schedule": False},
}


class Brightness(nn.Module):
    """Class 0 for dark images, 1 for bright ones, by a wide margin: no attack within 8/255 can flip it,
    so every member of a chain runs on every image."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        margin = self.scale * (images.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([-margin, margin, *[torch.full_like(margin, -10.0)] * 8], dim=1)


def _dark_and_bright(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = 0.2 + 0.6 * labels.view(-1, 1, 1, 1) + 0.05 * torch.rand(n, 3, 8, 8, generator=generator)
    return images, labels


@pytest.mark.parametrize("member", list(OFFICIAL))
def test_each_member_takes_the_official_autoattacks_settings(member):
    attack = ensemble_member(member, Brightness(), eps=8 / 255)
    assert {name: getattr(attack, name) for name in OFFICIAL[member]} == OFFICIAL[member]
    assert attack.eps == 8 / 255


def test_the_standard_version_runs_its_four_members_in_order_from_the_clean_images(monkeypatch):
    calls = []

    def recording(attack, images, labels, seed=0):
        calls.append((type(attack).__name__, len(images)))
        return run_attack(attack, images, labels, seed)

    run_attack = evaluation.run_attack
    monkeypatch.setattr(evaluation, "run_attack", recording)
    images, labels = _dark_and_bright()
    strong = StrongAttacks(8 / 255, [], pgd_steps=2, ensemble=["apgd-ce"], adaptive=False, autoattack="standard")
    names = [kind.name for kind in strong.kinds]
    assert names == ["pgd", "apgd-ce", "autoattack.apgd-ce", "autoattack.apgd-t", "autoattack.fab-t",
                     "autoattack.square"]
    final = strong.kinds[-1]
    assert final.worst_of == ("apgd-ce", "apgd-t", "fab-t", "square") and final.steps == 5000
    # FGSM left only the first two images standing: the project's chain goes on from those, AutoAttack from all.
    standing = {CLEAN.name: torch.ones(6, dtype=torch.bool), fgsm_kind(8 / 255).name: torch.arange(6) < 2}
    masks, _, _ = strong(Brightness(), images, labels, standing, lambda stage, name, compute: compute())
    assert calls == [("PGD", 2), ("APGD", 2), ("APGD", 6), ("APGDT", 6), ("FAB", 6), ("Square", 6)]
    assert all(masks[name].all() for name in names[2:])  # nothing within 8/255 flips Brightness


def test_an_unknown_autoattack_version_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"autoattack='plus' is not an AutoAttack version; choose standard, apgd"):
        RobustnessEvaluation(autoattack="plus")


def _report(autoattack: str | None) -> Report:
    strong = StrongAttacks(8 / 255, [], ensemble=["apgd-ce"], adaptive=False, autoattack=autoattack)
    report = Report()
    report.add("fp32", {"acc": {"clean": 0.8674}, "attack_success": {}, "images": {"clean": 10_000}}, [CLEAN])
    accuracy = dict(zip([kind.name for kind in strong.kinds], [0.42, 0.40, 0.45, 0.41, 0.40, 0.3905]))
    report.add("fp32", {"acc": accuracy, "attack_success": {}, "images": dict.fromkeys(accuracy, 1000), "clean_acc": 0.85},
               strong.kinds)
    return report


def test_the_robustbench_entry_carries_autoattacks_number_and_what_it_is_over():
    report = _report("standard")
    entry = robustbench_entry(report.rows_with_kinds(), About("improvedcnn_cifar10_adv", "ImprovedCNN", "pgd, ε 8/255"))
    assert entry["clean_acc"] == "86.74" and entry["autoattack_acc"] == "39.05"  # the last member: the worst case
    assert (entry["eps"], entry["threat_model"], entry["dataset"]) == ("8/255", "Linf", "cifar10")
    assert (entry["clean_examples"], entry["autoattack_examples"], entry["autoattack_version"]) == (10_000, 1000,
                                                                                                     "standard")
    assert entry["architecture"] == "ImprovedCNN" and entry["adversarial_training"] == "pgd, ε 8/255"
    assert set(entry["version"]) == {"cifar-lightning", "torch", "torchattacks"}
    json.dumps(entry)  # JSON as it is
    card = model_card(entry, report.headline())
    assert "| AutoAttack (standard) | 39.05% (1,000 test images) |" in card
    assert report.headline()["test/autoattack_acc"][0] == pytest.approx(0.3905)


def test_without_autoattack_the_entry_has_no_autoattack_number():
    report = _report(None)
    entry = robustbench_entry(report.rows_with_kinds(), About("improvedcnn_cifar10", "ImprovedCNN"))
    assert entry["autoattack_acc"] is None and "standard version was not run" in entry["footnote"]
    assert entry["clean_acc"] == "86.74" and "test/autoattack_acc" not in report.headline()
    assert "| AutoAttack | not run |" in model_card(entry, report.headline())


def test_the_apgd_version_runs_the_first_two_members_and_gives_no_autoattack_number():
    strong = StrongAttacks(8 / 255, [], ensemble=["apgd-ce"], adaptive=False, autoattack="apgd")
    assert [kind.name for kind in strong.autoattack_chain()] == ["autoattack.apgd-ce", "autoattack.apgd-t"]
    assert strong.autoattack_chain()[-1].steps == 100  # the standard version's budget
    report = Report()
    report.add("fp32", {"acc": {"clean": 0.8674}, "attack_success": {}, "images": {"clean": 10_000}}, [CLEAN])
    report.add("fp32", {"acc": dict(zip([kind.name for kind in strong.kinds], [0.42, 0.40, 0.45, 0.41])),
                        "attack_success": {}, "images": {kind.name: 1000 for kind in strong.kinds}, "clean_acc": 0.85},
               strong.kinds)
    entry = robustbench_entry(report.rows_with_kinds(), About("improvedcnn_cifar10_adv", "ImprovedCNN"))
    assert entry["autoattack_acc"] is None and "test/autoattack_acc" not in report.headline()


def test_the_entrys_eps_is_the_linf_budget_when_l2_rows_are_there_too():
    strong = StrongAttacks(8 / 255, [], ensemble=["apgd-ce"], adaptive=False, l2_eps=0.5)
    report = Report()
    report.add("fp32", {"acc": {"clean": 0.8674}, "attack_success": {}, "images": {"clean": 10_000}}, [CLEAN])
    report.add("fp32", {"acc": {kind.name: 0.3 for kind in strong.kinds}, "attack_success": {},
                        "images": {kind.name: 1000 for kind in strong.kinds}, "clean_acc": 0.85}, strong.kinds)
    entry = robustbench_entry(report.rows_with_kinds(), About("improvedcnn_cifar10_adv", "ImprovedCNN"))
    assert (entry["threat_model"], entry["eps"]) == ("Linf", "8/255")


def test_the_corruptions_entry_is_written_only_when_every_corruption_and_severity_ran():
    everything, report = CorruptionSuite(), Report()
    report.add("fp32", {"acc": {"clean": 0.9126}, "attack_success": {}, "images": {"clean": 10_000}}, [CLEAN])
    accuracy = {kind.name: 0.9 if kind.corruption == "none" else 0.7 + 0.001 * (kind.severity or 0)
                for kind in everything.kinds}
    report.add("fp32", {"acc": accuracy, "attack_success": {}, "images": dict.fromkeys(accuracy, 1000)}, everything.kinds)
    about = About("improvedcnn_cifar10", "ImprovedCNN")
    entry = corruptions_entry(report.rows_with_kinds(), about)
    assert (entry["threat_model"], entry["eps"], entry["clean_acc"]) == ("corruptions", None, "91.26")
    assert entry["corruptions_acc"] == "70.30"  # the mean of the 75, not counting the clean subset's 90%
    assert (entry["clean_examples"], entry["corruptions_examples"]) == (10_000, 1000)
    card = model_card(robustbench_entry(report.rows_with_kinds(), about), report.headline(), entry)
    assert "| common corruptions | 70.30% (1,000 test images) |" in card
    some, partial_report = CorruptionSuite(["fog"], [1, 2]), Report()
    partial_report.add("fp32", {"acc": {"clean": 0.9126}, "attack_success": {}, "images": {"clean": 10_000}}, [CLEAN])
    partial_report.add("fp32", {"acc": {kind.name: 0.7 for kind in some.kinds}, "attack_success": {},
                                "images": {kind.name: 1000 for kind in some.kinds}}, some.kinds)
    assert corruptions_entry(partial_report.rows_with_kinds(), about) is None  # not RobustBench's number
