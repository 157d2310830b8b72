"""Attack-failure checks: each fires on a model built to trigger it, stays quiet on the shipped weights,
and a flag reaches the rows, the summary and the headline's choice of best defense."""

import pandas as pd
import pytest
import torch
from torch import nn

from cifar_lightning.checks import AttackChecks, CheckCounts, Flag, flags
from cifar_lightning.data import load_cifar10
from cifar_lightning.defenses import MedianFilter
from cifar_lightning.evaluation import CLEAN, InputKind, StrongAttacks, fgsm_kind
from cifar_lightning.loading import load_model
from cifar_lightning.models import CIFAR10_NORMALIZATION, ImprovedCNN, pixel_input
from cifar_lightning.report import Report
from tests.helpers import REPO, SHARED_CIFAR10

EPS = 8 / 255
needs_data = pytest.mark.skipif(not (SHARED_CIFAR10 / "test.npz").is_file(), reason="needs ../shared/cifar10")


def shipped(name: str) -> nn.Module:
    return pixel_input(load_model(REPO / "weights" / name, ImprovedCNN()), CIFAR10_NORMALIZATION).eval()


class Randomised(nn.Module):
    """The network with noise on its input at every pass."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images + 0.05 * torch.randn_like(images))


class Quantised(nn.Module):
    """The network behind a step function (4 grey levels): its gradient is zero almost everywhere."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(torch.round(images * 3) / 3)


class Probabilities(nn.Module):
    """The network's softmax: probabilities where the attacks expect logits."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images).softmax(dim=1)


def fired(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, defenses=(), check_images: int = 16,
          square_queries: int = 300) -> dict[str, Flag]:
    """The checks that fire on ``model``: the study's strong attacks (PGD-10, APGD-CE) and every check."""
    strong = StrongAttacks(EPS, list(defenses), pgd_steps=10, ensemble=["apgd-ce"], defense_square=square_queries)
    checks = AttackChecks(images=check_images, square_queries=square_queries)
    with torch.inference_mode():
        right = model(images).argmax(dim=1) == labels
    standing = {CLEAN.name: right, fgsm_kind(EPS).name: right} | {
        fgsm_kind(EPS).defended(d).name: right for d in defenses}
    run_unit = lambda stage, name, compute: compute()
    sliced = torch.arange(len(labels)) < check_images
    robust, _, evidence = strong(model, images, labels, standing, run_unit, sliced)
    evidence |= checks(model, images, labels, robust, sliced, strong, run_unit)
    counts = CheckCounts(torch.device("cpu"))
    counts.update(evidence)
    return {flag.check: flag for flag in checks.flags("fp32", counts.compute(), strong)}


@pytest.fixture(scope="module")
def first_images():
    if not (SHARED_CIFAR10 / "test.npz").is_file():
        pytest.skip("needs ../shared/cifar10")
    images, labels = load_cifar10(SHARED_CIFAR10, train=False)
    return images[:32].float().div(255), labels[:32]


@needs_data
@pytest.mark.parametrize("weights", ["improvedcnn_cifar10.ckpt", "improvedcnn_cifar10_adv.ckpt"])
def test_every_check_stays_quiet_on_the_shipped_weights(weights, first_images):
    assert fired(shipped(weights), *first_images, check_images=32) == {}


@needs_data
def test_a_randomised_model_is_flagged_on_every_attacked_row(first_images):
    found = fired(Randomised(shipped("improvedcnn_cifar10_adv.ckpt")), *first_images)
    assert "randomised" in found and found["randomised"].inputs == ("pgd", "apgd-ce")
    assert found["randomised"].reason.startswith("randomised: 32 of 32 images get different outputs")


@needs_data
def test_a_step_function_in_front_is_flagged_for_zero_gradients_and_an_unreachable_misclassification(first_images):
    found = fired(Quantised(shipped("improvedcnn_cifar10.ckpt")), *first_images)
    assert {"zero_gradients", "large_eps"} <= set(found)
    assert "zero loss gradient" in found["zero_gradients"].reason


@needs_data
def test_a_model_that_outputs_probabilities_is_flagged(first_images):
    found = fired(Probabilities(shipped("improvedcnn_cifar10.ckpt")), *first_images)
    assert "logits" in found and "32 of 32 images are probabilities" in found["logits"].reason


@needs_data
def test_square_through_a_defense_counts_in_its_adaptive_row_and_flags_it(first_images):
    """The median filter defeats BPDA's identity gradient on a few images that Square still breaks."""
    model, median = shipped("improvedcnn_cifar10.ckpt"), MedianFilter(kernel_size=3)
    strong = StrongAttacks(0.03, [median], pgd_steps=20, ensemble=[])
    with_square = StrongAttacks(0.03, [median], pgd_steps=20, ensemble=[], defense_square=1000)
    images, labels = first_images
    standing = {CLEAN.name: torch.ones(32, dtype=torch.bool), fgsm_kind(0.03).name: torch.ones(32, dtype=torch.bool),
                fgsm_kind(0.03).defended(median).name: torch.ones(32, dtype=torch.bool)}
    run_unit = lambda stage, name, compute: compute()
    alone, _, none = strong(model, images, labels, standing, run_unit)
    both, _, evidence = with_square(model, images, labels, standing, run_unit)
    name = strong.adaptive_kind(median).name
    broken, checked = evidence["black_box/median_k3"]
    assert none == {} and checked.all() and with_square.adaptive_kind(median).worst_of == ("fgsm", "pgd", "square")
    # Worst of both per image: what Square broke comes off the adaptive row, and nothing else changes.
    assert torch.equal(both[name], alone[name] & ~broken) and broken.any()
    assert all(torch.equal(both[k], alone[k]) for k in alone if k != name)


def test_a_flagged_defense_is_never_the_best_one_unflagged():
    report = Report()
    adaptive = {d: InputKind("pgd", EPS, 20, 1, d, "adaptive", worst_of=("fgsm", "pgd", "square")) for d in "ab"}
    kinds = [CLEAN, *adaptive.values()]
    report.add("fp32", {"acc": {CLEAN.name: 0.9, adaptive["a"].name: 0.6, adaptive["b"].name: 0.3},
                        "attack_success": {}, "images": {kind.name: 100 for kind in kinds}}, kinds)
    best = report.headline()["test/best_defense_acc"]
    assert best[0] == 0.6 and best[1].startswith("a ")
    report.add_flags([Flag("fp32", "black_box/a", (adaptive["a"].name,), "black_box/a: Square breaks more")])
    best = report.headline()["test/best_defense_acc"]
    assert best[0] == 0.3 and best[1].startswith("b ") and best[1].endswith("; higher but flagged: a 60.00%")
    rows = report.details().set_index("input")
    assert rows.flag[adaptive["a"].name] == "black_box/a: Square breaks more" and rows.flag["clean"] == ""
    assert report.summary_frame().flagged_by.tolist() == ["black_box/a"]
    assert "**Flag** (fp32, adaptive/a)" in report.tables()["summary"]
    # Every defense flagged: the best one is named, with its flag.
    report.add_flags([Flag("fp32", "black_box/b", (adaptive["b"].name,), "black_box/b: also")])
    best = report.headline()["test/best_defense_acc"]
    assert best[0] == 0.6 and best[1].endswith("flagged: black_box/a: Square breaks more")  # nothing higher


def test_the_counts_flag_only_above_each_checks_tolerance():
    rows = {"attacked": ["pgd"], "pgd": ["pgd"], "chain": ["pgd"]}
    settings = {"steps": 20, "double_steps": 40, "large_eps": 0.12, "queries": 5000}
    counts = {"convergence": (2, 100), "large_eps": (6, 100), "black_box": (1, 100), "randomised": (1, 1000)}
    assert [flag.check for flag in flags("fp32", counts, rows, settings)] == ["large_eps", "randomised"]
    assert pd.Series([f.reason for f in flags("fp32", counts, rows, settings)]).str.contains("4×ε").sum() == 1
