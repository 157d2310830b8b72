"""Attacks: budgets, the model left exactly as found, adaptive attacks, and checks against gradient masking."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import torchattacks

from cifar_lightning.attacks import (
    APGDT,
    FGM,
    ThroughDefense,
    attack_chain,
    ensemble_member,
    fgsm,
    fgsm_at_budgets,
    pgd,
    project,
    run_attack,
)
from cifar_lightning.data import load_cifar10
from cifar_lightning.defenses import Defense, GaussianBlur, JpegCompression, MedianFilter
from cifar_lightning.evaluation import pgd_with_restarts, predicted_labels
from cifar_lightning.module import ClassifierModule
from tests.helpers import SHARED_CIFAR10

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(8 * 8 * 8, 10))


@pytest.fixture(scope="module")
def trained():
    """The shipped weights (Normalized ImprovedCNN, eval mode) and 128 real test images they mostly get right."""
    if not (SHARED_CIFAR10 / "test.npz").is_file():
        pytest.skip(f"no CIFAR-10 test.npz in {SHARED_CIFAR10}")
    net = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").net.eval()
    images, labels = load_cifar10(SHARED_CIFAR10, train=False)
    return net, images[:128].float() / 255, labels[:128]


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def _loss(model, images, labels):
    with torch.no_grad():
        return nn.functional.cross_entropy(model.eval()(images), labels).item()


def _accuracy(model, images, labels) -> float:
    return (predicted_labels(model, images) == labels).float().mean().item()


class Identity(Defense):
    """A defense that changes nothing, not even the rounding to 8 bits."""

    def _check_params(self) -> None: ...

    name = "identity"

    def process(self, image: np.ndarray) -> np.ndarray:
        return image

    def __call__(self, images):
        return images.clone()


def test_fgsm_stays_within_eps_and_the_pixel_range_and_raises_the_loss(model):
    images, labels = _batch()
    adversarial = run_attack(fgsm(model, eps=0.03), images, labels)
    assert (adversarial - images).abs().max() <= 0.03 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not torch.equal(adversarial, images)
    assert _loss(model, adversarial, labels) > _loss(model, images, labels)


def test_fgsm_at_several_budgets_from_one_gradient_is_torchattacks_fgsm_at_each(trained):
    net, images, labels = trained
    budgets = [0.03, 1 / 255, 16 / 255]
    with torch.inference_mode():  # as under trainer.test
        together = fgsm_at_budgets(net, images, labels, budgets)
    for eps, adversarial in zip(budgets, together):
        assert torch.equal(adversarial, run_attack(fgsm(net, eps), images, labels))


@pytest.mark.parametrize("make", [lambda m: fgsm(m, 0.03), lambda m: pgd(m, 0.03, steps=3),
                                  lambda m: ensemble_member("apgd-ce", m, 0.03), lambda m: FGM(m, 0.5),
                                  lambda m: pgd(m, 0.5, steps=3, norm="L2"),
                                  lambda m: ensemble_member("apgd-t", m, 0.5, norm="L2"),
                                  lambda m: ThroughDefense(m, MedianFilter(3))])
def test_an_attack_leaves_the_model_exactly_as_it_found_it(model, make):
    """Modes of every submodule (a wrapper's too), BatchNorm statistics, weights, gradients, and
    the global random stream. A wrapper restored to *its* mode used to switch the network inside
    to training."""
    images, labels = _batch()
    model.train()
    model[1].eval()  # mixed modes must come back as they were, module by module
    attack = make(model)
    target = attack if isinstance(attack, nn.Module) else attack.model
    if isinstance(attack, nn.Module):
        attack = pgd(attack, 0.03, steps=2)
        attack_target = target
        attack_target.train()  # even a wrapper left in training mode
    modes = {name: m.training for name, m in target.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with torch.inference_mode():
        run_attack(attack, images, labels)
    assert {name: m.training for name, m in target.named_modules()} == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_attacks_are_reproducible_and_seeded(model):
    images, labels = _batch()
    model.eval()
    first = run_attack(pgd(model, eps=0.03, steps=3), images, labels, seed=1)
    assert torch.equal(first, run_attack(pgd(model, eps=0.03, steps=3), images, labels, seed=1))
    assert not torch.equal(first, run_attack(pgd(model, eps=0.03, steps=3), images, labels, seed=2))


@pytest.mark.parametrize("norm, eps, reference", [("Linf", 0.03, torchattacks.PGD), ("L2", 0.5, torchattacks.PGDL2)])
def test_pgd_stepped_to_the_end_is_torchattacks_pgd(model, norm, eps, reference):
    """Same random start, same steps: the project's PGD is torchattacks' when no image stops early."""
    images, labels = _batch()
    model.eval()
    ours = run_attack(pgd(model, eps, steps=5, norm=norm, stop_when_fooled=False), images, labels, seed=4)
    theirs = run_attack(reference(model, eps=eps, alpha=2.5 * eps / 5, steps=5), images, labels, seed=4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_pgd_keeps_the_first_iterate_that_fools_the_model(trained):
    """BPDA through JPEG zigzags: torchattacks' last iterate is classified right again on images that an
    earlier iterate broke. The project's PGD counts them (and so breaks a superset of torchattacks'), and
    stops stepping an image once it is broken."""
    net, images, labels = trained
    defended = ThroughDefense(net, JpegCompression(30))
    judge = lambda x: predicted_labels(defended, x)
    right = judge(images) == labels
    images, labels = images[right], labels[right]
    passes = []
    counted = nn.Sequential(_Count(passes), defended)
    ours = judge(run_attack(pgd(counted, 0.03, steps=10), images, labels)) == labels
    theirs = judge(run_attack(torchattacks.PGD(defended, eps=0.03, alpha=2.5 * 0.03 / 10, steps=10),
                              images, labels)) == labels
    assert not (ours & ~theirs).any()  # every image torchattacks' PGD broke is broken
    assert (theirs & ~ours).sum() >= 2  # ... and some that only an earlier iterate broke
    assert passes[0] == len(labels) and sum(passes) < 0.7 * 10 * len(labels)  # broken images stop


class _Count(nn.Module):
    """The identity, noting how many images pass through."""

    def __init__(self, passes: list[int]) -> None:
        super().__init__()
        self.passes = passes

    def forward(self, images):
        self.passes.append(len(images))
        return images


def test_the_adaptive_attack_runs_the_real_defense_forward_and_its_approximation_backward(model):
    model.eval()
    images, labels = _batch()
    for defense in (MedianFilter(3), GaussianBlur(3)):
        x = images.clone().requires_grad_(True)
        nn.functional.cross_entropy(ThroughDefense(model, defense)(x), labels).backward()
        z = images.clone().requires_grad_(True)
        nn.functional.cross_entropy(model(defense(images) + defense.approximation(z) - defense.approximation(z).detach()),
                                    labels).backward()
        torch.testing.assert_close(x.grad, z.grad)
        assert ThroughDefense(model, defense)(images).equal(model(defense(images)))
    assert not ThroughDefense(model, MedianFilter(3)).training


def test_the_gaussian_approximation_is_the_blur_itself():
    images = torch.randint(0, 256, (4, 3, 32, 32)).float() / 255
    for kernel in (3, 5):
        blur = GaussianBlur(kernel)
        assert (blur(images) - blur.approximation(images)).abs().max() <= 0.5 / 255 + 1e-6  # rounding only


def test_bpda_through_an_identity_defense_is_the_plain_attack(trained):
    net, images, labels = trained
    plain = run_attack(pgd(net, 8 / 255, steps=5), images[:32], labels[:32], seed=3)
    through = run_attack(pgd(ThroughDefense(net, Identity()), 8 / 255, steps=5), images[:32], labels[:32], seed=3)
    torch.testing.assert_close(through, plain)


def test_attack_chain_runs_each_attack_on_the_images_still_standing():
    images, labels = torch.zeros(6, 1, 1, 1), torch.tensor([0, 0, 0, 0, 0, 1])
    seen = []

    def flip(values):  # an "attack" that sets the pixel of chosen images to 1
        def attack(x, y):
            seen.append(len(x))
            return torch.where(torch.isin(torch.arange(len(x)), torch.tensor(values)).view(-1, 1, 1, 1), 1.0, x)
        return attack

    judge = lambda x: x.flatten().long()
    adversarial, robust = attack_chain({"a": flip([0]), "b": flip([0, 1])}, judge, images, labels)
    # Image 5 is wrong when clean; "a" fools image 0; "b" sees the 4 left and fools the first two of them.
    assert seen == [5, 4]
    assert robust["a"].tolist() == [False, True, True, True, True, False]
    assert robust["b"].tolist() == [False, False, False, True, True, False]
    assert adversarial.flatten().tolist() == [1, 1, 1, 0, 0, 0]


def test_strong_attacks_are_at_least_as_strong_as_weak_ones(trained):
    """Carlini et al. 2019's sanity checks: PGD ≤ FGSM, more steps ≤ fewer, larger ε ≤ smaller,
    the ensemble ≤ each member alone, and a large ε leaves nothing."""
    net, images, labels = trained
    images, labels = images[:64], labels[:64]  # each takes ~90 gradient steps below: 64 of the 128 suffice
    eps = 2 / 255
    accuracy = {"fgsm": _accuracy(net, run_attack(fgsm(net, eps), images, labels), labels)}
    for steps in (3, 20):
        accuracy[f"pgd{steps}"] = _accuracy(net, run_attack(pgd(net, eps, steps), images, labels), labels)
    assert _accuracy(net, images, labels) > 0.8 and accuracy["fgsm"] > 0.1  # something to attack
    assert accuracy["pgd20"] <= accuracy["pgd3"] <= accuracy["fgsm"]
    by_eps = [_accuracy(net, run_attack(pgd(net, e / 255, 10), images, labels), labels) for e in (0.5, 1, 2, 4)]
    assert by_eps == sorted(by_eps, reverse=True)
    assert _accuracy(net, run_attack(pgd(net, 64 / 255, 10), images, labels), labels) <= 0.01

    judge = lambda x: predicted_labels(net, x)

    def member(name: str):  # 20 steps, not the paper's 100: the order of the numbers is what is checked
        attack = ensemble_member(name, net, eps)
        attack.steps = 20
        return lambda x, y: run_attack(attack, x, y)

    members = {name: member(name) for name in ("apgd-ce", "apgd-t")}
    few = slice(0, 16)  # APGD-T: 180 passes an image
    _, robust = attack_chain(members, judge, images[few], labels[few])
    alone = {name: _accuracy(net, attack(images[few], labels[few]), labels[few]) for name, attack in members.items()}
    # In the chain a member attacks only the images still standing, so its random starts differ from
    # those of a run on all of them: the chain may lose an image a lone run wins (seen: 8 vs 7 of 64).
    assert robust["apgd-t"].float().mean() <= min(alone.values()) + 1 / 16
    restarts = pgd_with_restarts(net, eps, steps=5, restarts=3)
    assert _accuracy(net, restarts(images, labels), labels) <= accuracy["pgd3"] + 1 / 64


L2_ATTACKS = {
    "fgm": lambda m, eps: FGM(m, eps),
    "pgd": lambda m, eps: pgd(m, eps, steps=5, norm="L2"),
    **{name: lambda m, eps, name=name: _cheap(ensemble_member(name, m, eps, norm="L2"))
       for name in ("apgd-ce", "apgd-t", "fab-t", "square")},
}


def _cheap(attack):
    """An ensemble member with a few steps (queries), for the shape of its output only."""
    attack.steps = attack.n_queries = 5
    attack.n_target_classes = 2
    return attack


@pytest.mark.parametrize("name", L2_ATTACKS)
def test_l2_attacks_stay_within_the_l2_ball_and_the_pixel_range(model, name):
    images, labels = _batch()
    model.eval()
    adversarial = run_attack(L2_ATTACKS[name](model, 0.5), images, labels)
    assert (adversarial - images).flatten(1).norm(dim=1).max() <= 0.5 * (1 + 1e-5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1 and adversarial.shape == images.shape


def test_l2_projection_shortens_only_what_is_outside_the_ball():
    clean = torch.full((3, 3, 4, 4), 0.5)
    step = torch.zeros_like(clean)
    step[0, 0, 0, 0], step[1, 0, 0, 0], step[2] = 0.3, 0.1, 0.01  # lengths 0.3, 0.1, √48·0.01 ≈ 0.069
    projected = project(clean + step, clean, eps=0.2, norm="L2")
    assert projected[0, 0, 0, 0].item() == pytest.approx(0.7)  # shortened to the radius
    assert torch.equal(projected[1:], (clean + step)[1:])  # inside: untouched


def test_apgd_t_steps_each_image_by_its_own_step_size(monkeypatch):
    """torchattacks' APGD-T steps a whole L2 batch by the first image's step size; the project's does
    not: from a fixed start, an image's result does not depend on the images beside it. Under L∞ it is
    torchattacks' APGD-T exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    images, labels = _batch()
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.zeros(*shape))  # APGD's L2 random start: x itself

    def one_by_one(make):
        return torch.cat([run_attack(make(), images[i:i + 1], labels[i:i + 1]) for i in range(len(labels))])

    def project_s():
        return APGDT(net, norm="L2", eps=1.0, steps=20, n_classes=10)

    torch.testing.assert_close(run_attack(project_s(), images, labels), one_by_one(project_s), atol=1e-5, rtol=0)
    theirs = lambda: torchattacks.APGDT(net, norm="L2", eps=1.0, steps=20, n_classes=10)
    assert (run_attack(theirs(), images, labels) - one_by_one(theirs)).abs().max() > 1e-3  # the bug, still there
    linf = [make(net, norm="Linf", eps=8 / 255, steps=10, n_classes=10) for make in (APGDT, torchattacks.APGDT)]
    assert torch.equal(*(run_attack(attack, images, labels) for attack in linf))


def test_l2_attacks_are_monotone_in_eps_and_stronger_than_fgm(trained):
    net, images, labels = trained
    images, labels = images[:64], labels[:64]
    by_eps = [_accuracy(net, run_attack(pgd(net, eps, 10, norm="L2"), images, labels), labels)
              for eps in (0.05, 0.1, 0.25, 0.5)]
    assert by_eps == sorted(by_eps, reverse=True) and by_eps[0] > 0.3  # something to attack at the smallest
    assert _accuracy(net, run_attack(pgd(net, 4.0, 10, norm="L2"), images, labels), labels) <= 0.02
    fgm = _accuracy(net, run_attack(FGM(net, 0.1), images, labels), labels)
    assert by_eps[1] <= fgm


@pytest.mark.parametrize("call, message", [
    (lambda m: fgsm(m, eps=-0.1), "eps=-0.1 must be in"),
    (lambda m: pgd(m, 0.5, norm="L1"), "norm='L1' is not a threat model"),
    (lambda m: pgd(m, float("nan"), norm="L2"), "eps=nan must be a positive number"),
    (lambda m: FGM(m, 0.0), "eps=0.0 must be a positive number"),
    (lambda m: ensemble_member("apgd-ce", m, -1.0, norm="L2"), "eps=-1.0 must be a positive number"),
    (lambda m: fgsm(m, eps=float("nan")), "eps=nan must be in"),
    (lambda m: pgd(m, steps=0), "steps=0 must be an integer >= 1"),
    (lambda m: ensemble_member("apgd-x", m, 0.03), "unknown attack 'apgd-x'"),
])
def test_bad_attack_values_are_refused_naming_the_field(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)
