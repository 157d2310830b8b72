"""Attacks: budgets, the model left exactly as found, adaptive attacks, and checks against gradient masking."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cifar_lightning.attacks import (
    ThroughDefense,
    attack_chain,
    ensemble_member,
    fgsm,
    fgsm_at_budgets,
    pgd,
    run_attack,
)
from cifar_lightning.data import load_cifar10
from cifar_lightning.defenses import Defense, GaussianBlur, MedianFilter
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
                                  lambda m: ensemble_member("apgd-ce", m, 0.03),
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
    members = {name: lambda x, y, name=name: run_attack(ensemble_member(name, net, eps), x, y)
               for name in ("apgd-ce", "apgd-t")}
    few = slice(0, 16)  # APGD-T: 900 passes an image
    _, robust = attack_chain(members, judge, images[few], labels[few])
    alone = {name: _accuracy(net, attack(images[few], labels[few]), labels[few]) for name, attack in members.items()}
    # In the chain a member attacks only the images still standing, so its random starts differ from
    # those of a run on all of them: the chain may lose an image a lone run wins (seen: 8 vs 7 of 64).
    assert robust["apgd-t"].float().mean() <= min(alone.values()) + 1 / 16
    restarts = pgd_with_restarts(net, eps, steps=5, restarts=3)
    assert _accuracy(net, restarts(images, labels), labels) <= accuracy["pgd3"] + 1 / 128


@pytest.mark.parametrize("call, message", [
    (lambda m: fgsm(m, eps=-0.1), "eps=-0.1 must be in"),
    (lambda m: fgsm(m, eps=float("nan")), "eps=nan must be in"),
    (lambda m: pgd(m, steps=0), "steps=0 must be an integer >= 1"),
    (lambda m: ensemble_member("apgd-x", m, 0.03), "unknown attack 'apgd-x'"),
])
def test_bad_attack_values_are_refused_naming_the_field(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)
