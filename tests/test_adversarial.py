"""Adversarial training: perturbation budgets, the model's state while crafting, robust validation, resume."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_lightning.adversarial import TrainingAttack
from cifar_lightning.module import ClassifierModule
from tests.helpers import CLI, HANG, quick_fit_args, run_cli, scalars

ADVERSARIAL = Path(__file__).resolve().parents[1] / "configs" / "adversarial.yaml"
EPS = 8 / 255


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(8 * 8 * 8, 10)).train()


def _batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(32, 3, 8, 8, generator=generator)
    images[:4] = 0.0  # at the edges of the pixel range, clipping matters
    images[4:8] = 1.0
    return images, torch.randint(0, 10, (32,), generator=generator)


@pytest.mark.parametrize("method, bound", [("fgsm_rs", EPS), ("pgd", EPS), ("n_fgsm", 3 * EPS)])
def test_perturbations_stay_within_their_budget_and_the_pixel_range(model, method, bound):
    images, labels = _batch()
    adversarial = TrainingAttack(method, EPS, steps=3)(model, images, labels)
    assert (adversarial - images).abs().max() <= bound + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - images).abs().max() > EPS / 2  # it did perturb
    if method == "n_fgsm":
        assert (adversarial - images).abs().max() > EPS  # no projection back into the ε-ball


def test_crafting_runs_the_model_as_the_step_does_and_leaves_its_statistics(model):
    """Training mode while crafting (batch statistics, dropout), BatchNorm running statistics put
    back, and the model left in training mode; `none` returns the batch itself."""
    images, labels = _batch()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model[1].register_forward_hook(lambda module, *_: seen.append(module.training))
    for method in ("fgsm_rs", "n_fgsm", "pgd"):
        TrainingAttack(method, EPS, steps=2)(model, images, labels)
    assert seen and all(seen) and model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert TrainingAttack("none")(model, images, labels) is images


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "fgsm"}, "method='fgsm' must be one of none, fgsm_rs, n_fgsm, pgd"),
    ({"eps": 1.5}, "eps=1.5 must be in"),
    ({"alpha": 0.0}, "alpha=0.0 must be > 0"),
    ({"steps": 0}, "steps=0 must be an integer >= 1"),
])
def test_bad_training_attack_values_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingAttack(**{"method": "pgd"} | kwargs)


def test_robust_validation_does_not_change_the_standard_training_run(cifar_slice, fitted_run, tmp_path):
    """`adversarial: none` with `val/pgd_acc` logged trains exactly the default run: same curves, same weights."""
    run_cli(*quick_fit_args(cifar_slice, "--model.val_attack_images", "32"), cwd=tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    logged, default = scalars(run), scalars(fitted_run)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert logged[tag] == default[tag], tag
    assert len(logged["val/pgd_acc"]) == 1 and logged["val/pgd_acc"][0] <= logged["val/fgsm_acc"][0] + 1 / 32
    weights = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    reference = torch.load(fitted_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def _adversarial_fit_args(data_dir: Path, *extra: str) -> list[str]:
    return quick_fit_args(data_dir, "--config", str(ADVERSARIAL), "--model.val_attack_images", "32",
                          "--model.adversarial", "fgsm_rs", *extra)


def _readable(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError):  # still being written
        return False
    return True


def test_an_adversarial_fit_checkpoints_by_robust_accuracy_and_resumes_after_a_kill(cifar_slice, tmp_path):
    args = _adversarial_fit_args(cifar_slice, "--trainer.max_epochs", "3")
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    run = subprocess.Popen([*CLI, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG
    while run.poll() is None and time.monotonic() < deadline:
        if last.is_file() and _readable(last):  # first written at the end of epoch 0
            run.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(last, weights_only=True)["global_step"] < 3 * 9

    run_cli(*args, "--ckpt_path", "last", cwd=tmp_path)
    run_dir = last.parent.parent
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 3 * 9  # the remaining steps, not 3 more epochs
    assert final["hyper_parameters"]["adversarial"] == "fgsm_rs"
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    [state] = [s for key, s in best["callbacks"].items() if key.startswith("ModelCheckpoint") and "val/pgd_acc" in key]
    pgd_acc = scalars(run_dir)["val/pgd_acc"]
    assert len(pgd_acc) == 3 and state["best_model_score"].item() == pytest.approx(max(pgd_acc))
    assert final["best_pgd_acc"] == pytest.approx(max(pgd_acc))


def test_catastrophic_overfitting_is_detected_and_stops_the_fit():
    module = ClassifierModule(adversarial="n_fgsm", val_attack_images=100)
    module.best_pgd_acc = 0.40

    class Trainer:  # the two things the hook reads
        sanity_checking, training, should_stop, current_epoch = False, True, False, 5
        callback_metrics = {"val/pgd_acc": torch.tensor(0.05), "val/fgsm_acc": torch.tensor(0.80)}

    module.trainer = Trainer()
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: value})
    with pytest.warns(UserWarning, match="catastrophic overfitting at epoch"):
        module.on_validation_epoch_end()
    assert logged["val/catastrophic_overfitting"] == 1.0 and module.trainer.should_stop
