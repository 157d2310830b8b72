import pytest
import torch
from torch import nn

from cifar_lightning.attacks import BPDA, fgsm, pgd, run_attack
from cifar_lightning.defenses import MedianFilter


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(8 * 8 * 8, 10))


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def _loss(model, images, labels):
    with torch.no_grad():
        return nn.functional.cross_entropy(model.eval()(images), labels).item()


def test_fgsm_stays_within_eps_and_the_pixel_range_and_raises_the_loss(model):
    images, labels = _batch()
    adversarial = run_attack(fgsm(model, eps=0.03), images, labels)
    assert (adversarial - images).abs().max() <= 0.03 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not torch.equal(adversarial, images)
    assert _loss(model, adversarial, labels) > _loss(model, images, labels)


def test_attacks_work_under_inference_mode_and_keep_the_model_mode(model):
    images, labels = _batch()
    model.train()
    with torch.inference_mode():
        adversarial = run_attack(fgsm(model, eps=0.03), images, labels)
    assert model.training and not adversarial.requires_grad
    model.eval()
    again = run_attack(fgsm(model, eps=0.03), images, labels)
    assert not model.training
    torch.testing.assert_close(adversarial, again)  # eval mode inside: dropout did not vary


def test_pgd_is_at_least_as_strong_as_fgsm(model):
    images, labels = _batch()
    one_step = run_attack(fgsm(model, eps=0.03), images, labels)
    many_steps = run_attack(pgd(model, eps=0.03, alpha=0.01, steps=10), images, labels)
    assert (many_steps - images).abs().max() <= 0.03 + 1e-6
    assert _loss(model, many_steps, labels) >= _loss(model, one_step, labels)


def test_bpda_forward_is_the_defense_and_its_gradient_passes_straight_through(model):
    model.eval()
    images, labels = _batch()
    defense = MedianFilter(3)
    x = images.clone().requires_grad_(True)
    nn.functional.cross_entropy(BPDA(model, defense)(x), labels).backward()
    z = defense(images).requires_grad_(True)
    loss_at_defended = nn.functional.cross_entropy(model(z), labels)
    loss_at_defended.backward()
    torch.testing.assert_close(x.grad, z.grad)
    assert BPDA(model, defense)(images).equal(model(defense(images)))


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_eps_outside_the_pixel_range_is_rejected(model, eps):
    with pytest.raises(ValueError, match=f"eps={eps} must be in"):
        fgsm(model, eps=eps)


def test_pgd_rejects_bad_steps(model):
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        pgd(model, steps=0)
