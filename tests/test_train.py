"""Training through the `cifar-lightning` entry point, single process and DDP on CPU."""

import pytest
import torch
import lightning as L

from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.module import ClassifierModule, NonFiniteLossError
from tests.helpers import quick_fit_args, run_cli, scalars


def test_one_epoch_fit_writes_checkpoints_and_scalars(fitted_run):
    run = fitted_run
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    logged = scalars(run)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "train/lr"):
        assert len(logged[tag]) == 1, tag
    assert 0 <= logged["val/acc"][0] <= 1
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["network"]["class_path"] == "cifar_lightning.models.ImprovedCNN"
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 576 // 64


def test_a_second_run_gets_its_own_version_folder(cifar_slice, tmp_path):
    for _ in range(2):
        run_cli(*quick_fit_args(cifar_slice, "--trainer.limit_train_batches", "2"), cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_a_run_stopped_mid_epoch_by_max_steps_ends_cleanly(cifar_slice, tmp_path):
    run_cli(*quick_fit_args(cifar_slice, "--trainer.max_steps", "3"), cwd=tmp_path)  # 3 of the epoch's 9 steps
    checkpoint = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3


def test_ddp_on_two_cpu_processes_syncs_validation_metrics(cifar_slice, tmp_path):
    run_cli(*quick_fit_args(cifar_slice, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                            "--trainer.strategy", "ddp"), cwd=tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    assert not (tmp_path / "lightning_logs" / "version_1").exists()  # rank 1 writes no run of its own
    ddp_val_acc = scalars(run)["val/acc"][0]

    # The same checkpoint validated in one process over all 64 validation images.
    module = ClassifierModule.load_from_checkpoint(run / "checkpoints" / "best.ckpt", weights_only=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    [single] = trainer.validate(module, CIFAR10DataModule(data_dir=str(cifar_slice), batch_size=64))
    assert ddp_val_acc == pytest.approx(single["val/acc"], abs=1e-6)


def test_non_finite_loss_stops_training_with_a_clear_error():
    module = ClassifierModule()
    module.trainer = None
    images = torch.full((4, 3, 32, 32), float("nan"))
    with pytest.raises(NonFiniteLossError, match="training loss is nan"):
        module.training_step((images, torch.zeros(4, dtype=torch.long)), 0)


def test_a_network_that_does_not_fit_cifar10s_classes_is_refused():
    from cifar_lightning.models import ImprovedCNN

    with pytest.raises(ValueError, match="num_classes=5 must be 10, the classes of CIFAR-10"):
        ClassifierModule(num_classes=5)
    with pytest.raises(ValueError, match="the network returns 5 logits, not num_classes=10"):
        ClassifierModule(network=ImprovedCNN(num_classes=5))


def test_time_to_accuracy_counts_epochs_and_running_minutes_across_a_resume(tmp_path, monkeypatch):
    import time

    from torch.utils.tensorboard import SummaryWriter

    from scripts.time_to_accuracy import first_reaching, validation_curve

    # Two epochs and half a minute more, in a file rewritten later (created after its scalars); a pause of
    # an hour (killed, then `--ckpt_path last`); the third epoch, which the resumed run finishes a minute
    # after it starts and before it logs its first scalar.
    for session, (created, start, end, points) in enumerate([(9000, 1000, 1150, [(10, 0.70, 1060), (20, 0.80, 1120)]),
                                                             (5000, None, 5060, [(30, 0.90, 5060)])]):
        monkeypatch.setattr(time, "time", lambda: created)
        writer = SummaryWriter(tmp_path, filename_suffix=f".{session}")
        monkeypatch.undo()
        if start is not None:
            writer.add_scalar("train/loss", 1.0, 0, walltime=start)
        for step, acc, wall_time in points:
            writer.add_scalar("val/acc", acc, step, walltime=wall_time)
        writer.add_scalar("train/loss", 1.0, 1, walltime=end)
        writer.close()
    curve = validation_curve(tmp_path)
    assert curve.epoch.tolist() == [1, 2, 3]
    assert curve.minutes.tolist() == pytest.approx([1.0, 2.0, 3.5])  # 2.5 minutes in the first session, 1 after
    assert first_reaching(curve, 0.75) == ("2", "2.0")
    assert first_reaching(curve, 0.95)[0].startswith("not reached (90.00% best, 3 epochs)")
