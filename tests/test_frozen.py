"""The frozen, fast copy the study runs: the same predictions as the network, BatchNorm folded, the network untouched."""

from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_lightning.attacks import fgsm, fgsm_at_budgets, run_attack
from cifar_lightning.data import load_cifar10
from cifar_lightning.frozen import frozen_copy, joint_pass
from cifar_lightning.models import CIFAR10_NORMALIZATION, ImprovedCNN, pixel_input
from cifar_lightning.module import ClassifierModule
from cifar_lightning.quantization import quantize_dynamic_linear, quantize_static
from tests.helpers import SHARED_CIFAR10

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"


def test_the_copy_folds_batchnorm_and_predicts_as_the_network_on_real_images():
    if not (SHARED_CIFAR10 / "test.npz").is_file():
        pytest.skip(f"no CIFAR-10 test.npz in {SHARED_CIFAR10}")
    net = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").net.eval()
    images, labels = load_cifar10(SHARED_CIFAR10, train=False)
    images = images[:1000].float() / 255
    with torch.inference_mode():  # made where trainer.test makes it
        frozen = frozen_copy(net)
        eager, folded = net(images), frozen(images)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert torch.equal(eager.argmax(1), folded.argmax(1))
    assert (eager - folded).abs().max() < 1e-4
    # Its weights allow autograd although it was made in inference mode: attacks run on it.
    attacked = fgsm_at_budgets(frozen, images[:64], labels[:64], [0.03])[0]
    differs = (attacked != run_attack(fgsm(net, 0.03), images[:64], labels[:64])).float().mean()
    assert differs < 1e-3, differs  # gradient signs part only where a gradient is ~0


def test_the_network_is_left_as_it_was_and_a_network_fx_cannot_trace_is_copied_unfolded():
    net = pixel_input(ImprovedCNN(), CIFAR10_NORMALIZATION).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = frozen_copy(net)
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())

    class DataDependent(nn.Module):  # control flow on a value: no torch.fx graph
        def __init__(self) -> None:
            super().__init__()
            self.net = ImprovedCNN().eval()

        def forward(self, x):
            return self.net(x) if x.mean() > 0 else -self.net(x)

    with pytest.warns(UserWarning, match="without BatchNorm folding .*torch.fx could not trace"):
        unfolded = frozen_copy(DataDependent())
    assert any(isinstance(m, nn.BatchNorm2d) for m in unfolded.modules()) and not unfolded.training


def test_fast_false_evaluates_the_network_itself_and_a_training_step_renews_the_copy():
    module = ClassifierModule(fast=False)
    assert module.frozen_net() is module.net
    module = ClassifierModule()
    first = module.frozen_net()
    assert module.frozen_net() is first  # made once ...
    module.on_train_batch_end(None, None, 0)
    assert module.frozen_net() is not first  # ... and again after the weights changed
    assert "fast" not in module.hparams  # not a property of the weights: checkpoints do not keep it


def test_the_joint_pass_runs_the_shared_layers_once_and_gives_each_models_logits():
    torch.manual_seed(0)
    folded = frozen_copy(pixel_input(ImprovedCNN(), CIFAR10_NORMALIZATION).eval())
    dynamic = quantize_dynamic_linear(folded)
    joint = joint_pass(folded, dynamic)
    layers = [type(joint.get_submodule(node.target)) for node in joint.graph.nodes if node.op == "call_module"]
    convolutions = sum(layers.count(kind) for kind in (nn.Conv2d, nn.Linear))
    assert convolutions == 6 + 2  # the 6 convolutions once, the FP32 Linear layers once; the int8 ones beside them
    images = torch.rand(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        first, second = joint(images)
        assert torch.equal(first, folded(images)) and torch.equal(second, dynamic(images))
    assert not torch.equal(first, second)  # the int8 Linear layers did run
    # Not the same graph (static int8 rewrites every layer), or not a graph at all: no joint pass.
    assert joint_pass(folded, quantize_static(folded, torch.rand(16, 3, 32, 32))) is None
    assert joint_pass(pixel_input(ImprovedCNN(), CIFAR10_NORMALIZATION).eval(), dynamic) is None
