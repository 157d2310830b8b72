"""Faults and bad input: a killed run resumes, bad values and files are refused clearly, runs repeat."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cifar_lightning.cli import main
from cifar_lightning.module import ClassifierModule
from tests.helpers import CLI, CONFIG, callback_args, quick_fit_args, run_cli, scalars, write_config

EPOCH_STEPS = 576 // 64  # the slice's training images / batch size of quick_fit_args


def _callback_state(checkpoint: dict, class_name: str) -> dict:
    [state] = [s for key, s in checkpoint["callbacks"].items() if key.startswith(class_name)]
    return state


def _adamw_steps(checkpoint: dict) -> set[int]:
    return {int(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()}


def test_a_run_killed_mid_epoch_resumes_where_it_stopped(cifar_slice, tmp_path):
    config = write_config(tmp_path, lambda c: callback_args(c, "ModelCheckpoint", save_top_k=0).update(
        every_n_train_steps=4))
    args = quick_fit_args(cifar_slice, "--trainer.max_epochs", "3", config=config)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"

    run = subprocess.Popen([*CLI, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_at = time.monotonic() + 240, None
    while killed_at is None and run.poll() is None and time.monotonic() < deadline:
        if last.is_file() and (step := torch.load(last, weights_only=True)["global_step"]) > EPOCH_STEPS:
            run.send_signal(signal.SIGKILL)
            killed_at = step
        time.sleep(0.1)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed in its second epoch"

    # The checkpoint it resumes from, as the kill left it, with markers in the early-stopping and
    # scheduler states: a best validation loss no real epoch reaches.
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] >= killed_at and checkpoint["global_step"] % EPOCH_STEPS, "not mid-epoch"
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 1
    _callback_state(checkpoint, "EarlyStopping")["best_score"] = torch.tensor(1e-3)
    checkpoint["lr_schedulers"][0]["best"] = 1e-3
    torch.save(checkpoint, last)

    result = run_cli(*args, "--ckpt_path", "last", cwd=tmp_path)
    assert f"--ckpt_path last is {last.relative_to(tmp_path)}" in result.stderr
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # resumed in place
    run_dir = last.parent.parent
    assert {"config.yaml", "config.resume1.yaml"} <= {p.name for p in run_dir.iterdir()}  # first config kept

    final = torch.load(last, weights_only=True)
    assert (final["epoch"], final["global_step"]) == (2, 3 * EPOCH_STEPS)  # the remaining steps, not 3 more epochs
    assert _adamw_steps(final) == {3 * EPOCH_STEPS}  # AdamW moments continued, not restarted
    plateau = final["lr_schedulers"][0]
    # Saved after epoch 2's validation, before its scheduler step: epochs 0 and 1 counted, as in an
    # uninterrupted run, the resumed epoch 1 included; and its state restored, so epoch 1 did not beat
    # the marker (one bad epoch).
    assert (plateau["last_epoch"], plateau["best"], plateau["num_bad_epochs"]) == (2, 1e-3, 1)
    early_stopping = _callback_state(final, "EarlyStopping")
    assert early_stopping["best_score"].item() == pytest.approx(1e-3)  # the marker: its state was restored
    assert early_stopping["wait_count"] == 2  # no later epoch beat it
    assert len(scalars(run_dir)["val/loss"]) == 3  # epoch 0's curve from before the kill, and 1 and 2


def test_last_with_no_run_to_resume_starts_a_new_fit_and_fails_a_test(cifar_slice, tmp_path):
    result = run_cli(*quick_fit_args(cifar_slice, "--trainer.limit_train_batches", "2",
                                     "--trainer.limit_val_batches", "2", "--ckpt_path", "last"), cwd=tmp_path)
    assert "starting a new run" in result.stderr
    test = subprocess.run([*CLI, "test", "--config", str(CONFIG), "--data.data_dir", str(cifar_slice),
                           "--ckpt_path", "last", "--trainer.logger.init_args.save_dir", "elsewhere"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert test.returncode == 2 and "Traceback" not in test.stderr
    assert "--ckpt_path last: no elsewhere/lightning_logs/version_*/checkpoints/last.ckpt" in test.stderr


def _cli_error(capsys, *args: str) -> str:
    """Run the entry point in this process; it must exit 2 with one error line and no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cifar-lightning: error:")]
    return line


@pytest.mark.parametrize(
    ("callback", "field", "value", "message"),
    [
        ("RobustnessEvaluation", "eps", -0.1, "RobustnessEvaluation: eps=-0.1 must be in [0, 1]"),
        ("RobustnessEvaluation", "eps", 1.5, "RobustnessEvaluation: eps=1.5 must be in [0, 1]"),
        ("GaussianBlur", "kernel_size", 4, "GaussianBlur: kernel_size=4 must be an odd integer >= 3"),
        ("MedianFilter", "kernel_size", 1, "MedianFilter: kernel_size=1 must be an odd integer >= 3"),
        ("JpegCompression", "quality", 0, "JpegCompression: quality=0 must be an integer in 1..95"),
        ("JpegCompression", "quality", 100, "JpegCompression: quality=100 must be an integer in 1..95"),
        ("TotalVariationDenoise", "weight", 0.0, "TotalVariationDenoise: weight=0.0 must be a finite number > 0"),
    ],
)
def test_out_of_range_callback_values_are_refused_naming_the_field(capsys, tmp_path, callback, field, value, message):
    def edit(config):
        if callback == "RobustnessEvaluation":
            callback_args(config, callback)[field] = value
        else:
            [defense] = [d for d in callback_args(config, "RobustnessEvaluation")["defenses"]
                         if d["class_path"].endswith(callback)]
            defense["init_args"][field] = value

    line = _cli_error(capsys, "test", "--config", str(write_config(tmp_path, edit)), "--data.data_dir", str(tmp_path))
    assert line.startswith(f"cifar-lightning: error: invalid configuration: {message}")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--data.val_fraction", "0", "CIFAR10DataModule: val_fraction=0.0 must be in (0, 1)"),
        ("--data.val_fraction", "1", "CIFAR10DataModule: val_fraction=1.0 must be in (0, 1)"),
        ("--data.batch_size", "0", "CIFAR10DataModule: batch_size=0 must be at least 1"),
        ("--model.lr", "-1", "ClassifierModule: lr=-1.0 must be > 0"),
    ],
)
def test_out_of_range_model_and_data_values_are_refused_naming_the_field(capsys, tmp_path, flag, value, message):
    line = _cli_error(capsys, "fit", "--config", str(CONFIG), "--data.data_dir", str(tmp_path), f"{flag}={value}")
    assert line.startswith(f"cifar-lightning: error: invalid configuration: {message}")


def _test_with_checkpoint(capsys, data_dir, checkpoint) -> str:
    return _cli_error(capsys, "test", "--config", str(CONFIG), "--data.data_dir", str(data_dir),
                      "--ckpt_path", str(checkpoint))


def test_a_file_that_is_not_a_checkpoint_is_refused(capsys, cifar_slice, tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert "notes.ckpt is not a readable checkpoint" in _test_with_checkpoint(capsys, cifar_slice,
                                                                             tmp_path / "notes.ckpt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.ckpt")
    assert "dict.ckpt is not a Lightning checkpoint" in _test_with_checkpoint(capsys, cifar_slice,
                                                                             tmp_path / "dict.ckpt")
    assert "missing.ckpt does not exist" in _test_with_checkpoint(capsys, cifar_slice, tmp_path / "missing.ckpt")


def test_a_truncated_checkpoint_is_refused(capsys, cifar_slice, fitted_run, tmp_path):
    data = (fitted_run / "checkpoints" / "best.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    line = _test_with_checkpoint(capsys, cifar_slice, tmp_path / "cut.ckpt")
    assert "cut.ckpt is not a readable checkpoint; it may be truncated" in line


def test_a_checkpoint_of_another_network_is_refused(capsys, cifar_slice, tmp_path):
    other = ClassifierModule(network=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.ckpt")
    line = _test_with_checkpoint(capsys, cifar_slice, tmp_path / "other.ckpt")
    assert "other.ckpt holds weights of another network (missing net.model.features.0.0.weight" in line
    assert "--model.network" in line


def test_fit_refuses_to_resume_from_weights_only(capsys, cifar_slice):
    weights = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"
    line = _cli_error(capsys, "fit", "--config", str(CONFIG), "--data.data_dir", str(cifar_slice),
                      "--ckpt_path", str(weights))
    assert "improvedcnn_cifar10.ckpt holds weights only, not the optimizer and loop state" in line
    assert "--ckpt_path last" in line and "cifar-lightning test" in line


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: the kind of code a crafted checkpoint hides."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(cifar_slice, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = {"state_dict": ClassifierModule().state_dict(), "payload": _Payload(marker)}
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    for subcommand in ("test", "fit"):
        result = subprocess.run([*CLI, subcommand, "--config", str(CONFIG), "--data.data_dir", str(cifar_slice),
                                 "--ckpt_path", str(tmp_path / "crafted.ckpt")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "refused to load" in result.stderr and "would run code" in result.stderr
        assert not marker.exists()
    torch.load(tmp_path / "crafted.ckpt", weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_best_checkpoint(cifar_slice, tmp_path):
    import lightning as L

    from cifar_lightning.data import CIFAR10DataModule
    from cifar_lightning.module import NonFiniteLossError

    class BreakWeightsInEpoch1(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.net.model.classifier[-1].weight.fill_(float("inf"))

    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max")
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, callbacks=[best, BreakWeightsInEpoch1()])
    with pytest.raises(NonFiniteLossError, match=r"training loss is (nan|inf) at epoch 1, step 9\. Fix: lower --model\.lr"):
        trainer.fit(ClassifierModule(), CIFAR10DataModule(data_dir=str(cifar_slice), batch_size=64))
    saved = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert saved["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())


def test_two_runs_with_the_same_seed_give_identical_metrics(cifar_slice, fitted_run, tmp_path):
    run_cli(*quick_fit_args(cifar_slice), cwd=tmp_path)  # the arguments of the fitted_run fixture
    again = scalars(tmp_path / "lightning_logs" / "version_0")
    first = scalars(fitted_run)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert again[tag] == first[tag], tag
    weights = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for run in (fitted_run, tmp_path / "lightning_logs" / "version_0")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_second_test_run_never_overwrites_the_first(cifar_slice, fitted_run, tested_run):
    first = {p.name: p.stat().st_mtime_ns for p in tested_run.iterdir()}
    run_cli("test", "--config", str(CONFIG), "--data.data_dir", str(cifar_slice), "--data.batch_size", "32",
            "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt"), "--trainer.limit_test_batches", "2",
            "--trainer.enable_progress_bar", "false", cwd=tested_run.parents[1])
    assert {p.name: p.stat().st_mtime_ns for p in tested_run.iterdir()} == first
    assert (tested_run.parent / "version_1" / "results.md").is_file()
    assert not list(tested_run.parent.rglob("*.tmp"))  # atomic writes leave no temporary files behind
