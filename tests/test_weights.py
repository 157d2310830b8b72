"""The shipped reference weights: safe to load, and the trained model they claim to be."""

from pathlib import Path

import pytest
import torch

from cifar_lightning.data import load_cifar10
from cifar_lightning.module import ClassifierModule
from tests.helpers import SHARED_CIFAR10

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"
ROBUST = WEIGHTS.with_name("improvedcnn_cifar10_adv.ckpt")  # adversarially trained (configs/adversarial.yaml)


@pytest.mark.parametrize("weights", [WEIGHTS, ROBUST], ids=["standard", "robust"])
def test_weights_are_a_small_weights_only_checkpoint(weights):
    checkpoint = torch.load(weights, weights_only=True)  # plain tensors and builtins: no code can run
    assert "optimizer_states" not in checkpoint
    assert weights.stat().st_size / 1e6 == pytest.approx(13.02, abs=0.05)


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="needs ../shared/cifar10")
def test_robust_weights_resist_pgd_where_the_standard_ones_fall():
    from cifar_lightning.attacks import pgd, run_attack

    images, labels = load_cifar10(SHARED_CIFAR10, train=False)
    images, labels = images[:64].float() / 255, labels[:64]
    robust = {}
    for name, weights in (("standard", WEIGHTS), ("robust", ROBUST)):
        net = ClassifierModule.load_from_checkpoint(weights, weights_only=True, map_location="cpu").net.eval()
        adversarial = run_attack(pgd(net, 8 / 255, steps=10), images, labels)
        with torch.inference_mode():
            robust[name] = (net(adversarial).argmax(1) == labels).float().mean().item()
    assert robust["standard"] <= 0.05 and robust["robust"] >= 0.25


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="needs ../shared/cifar10")
def test_weights_classify_real_test_images():
    module = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").eval()
    images, labels = load_cifar10(SHARED_CIFAR10, train=False)
    with torch.inference_mode():
        accuracy = (module(images[:500].float() / 255).argmax(1) == labels[:500]).float().mean().item()
    assert accuracy > 0.8


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="needs ../shared/cifar10")
def test_dynamic_int8_copy_of_the_trained_model_agrees_with_fp32():
    from cifar_lightning.quantization import quantize_dynamic_linear

    net = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").net.eval()
    images = load_cifar10(SHARED_CIFAR10, train=False)[0][:500].float() / 255
    with torch.inference_mode():
        agreement = (net(images).argmax(1) == quantize_dynamic_linear(net)(images).argmax(1)).float().mean()
    assert agreement >= 0.98


def test_export_keeps_the_weights_and_the_recipe_and_never_overwrites(fitted_run, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "export_weights.py"
    output = tmp_path / "mine.ckpt"
    source = fitted_run / "checkpoints" / "best.ckpt"
    subprocess.run([sys.executable, str(script), str(source), str(output)], check=True, capture_output=True)
    exported, full = torch.load(output, weights_only=True), torch.load(source, weights_only=True)
    assert "optimizer_states" not in exported and "loops" not in exported
    assert all(torch.equal(exported["state_dict"][k], full["state_dict"][k]) for k in full["state_dict"])
    assert exported["datamodule_hyper_parameters"] == {"batch_size": 64, "val_fraction": 0.1, "split_seed": 0,
                                                       "augment": True}
    again = subprocess.run([sys.executable, str(script), str(source), str(output)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists; not overwritten" in again.stderr
