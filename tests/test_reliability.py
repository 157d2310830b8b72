"""Faults: a killed run resumes, a diverging one stops, runs repeat and never overwrite each other.

Bad input is in test_errors.py."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from cifar_lightning.module import ClassifierModule
from tests.conftest import TESTED_RUN, small_subset
from tests.helpers import (
    CLI,
    CONFIG,
    HANG,
    REPO,
    TESTS_IMPORTABLE,
    callback_args,
    cli_error,
    quick_fit_args,
    run_cli,
    scalars,
    write_config,
)

EPOCH_STEPS = 576 // 64  # the slice's training images / batch size of quick_fit_args


def _callback_state(checkpoint: dict, class_name: str) -> dict:
    [state] = [s for key, s in checkpoint["callbacks"].items() if key.startswith(class_name)]
    return state


def _adamw_steps(checkpoint: dict) -> set[int]:
    return {int(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()}


def _run_with_signal(args: list[str], cwd: Path, edit, signal_name: str, first: bool = False,
                     **at) -> subprocess.CompletedProcess:
    """The command of ``args`` with the config of ``edit`` (the same config it gives) plus
    ``tests.helpers.SignalAt`` (last, or ``first`` among the callbacks), which sends ``signal_name``
    to the run at the moment ``at``."""
    def edit_and_signal(config: dict) -> None:
        edit(config)
        signaller = {"class_path": "tests.helpers.SignalAt", "init_args": {"signal_name": signal_name, **at}}
        config["trainer"]["callbacks"].insert(0 if first else len(config["trainer"]["callbacks"]), signaller)

    (cwd / "signalled").mkdir(exist_ok=True)
    config = write_config(cwd / "signalled", edit_and_signal)
    args = [str(config) if arg == args[args.index("--config") + 1] else arg for arg in args]
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=HANG,
                          env=os.environ | TESTS_IMPORTABLE)


def test_a_run_killed_mid_epoch_resumes_where_it_stopped(cifar_slice, tmp_path):
    # Killed at step 14 of 27, in the second epoch, two steps after last.ckpt was written (every 4 steps).
    def every_4_steps(config: dict) -> None:
        callback_args(config, "LastCheckpoint").update(every_n_train_steps=4)

    config = write_config(tmp_path, every_4_steps)
    args = quick_fit_args(cifar_slice, "--trainer.max_epochs", "3", config=config)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    run = _run_with_signal(args, tmp_path, every_4_steps, "SIGKILL", step=14)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]

    # The checkpoint it resumes from, as the kill left it, with markers in the early-stopping and
    # scheduler states: a best validation loss no real epoch reaches.
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 12
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


@TESTED_RUN
def test_a_second_test_run_never_overwrites_the_first(cifar_slice, fitted_run, tested_run, tmp_path):
    first = {p.name: p.stat().st_mtime_ns for p in tested_run.iterdir()}
    config = write_config(tmp_path, lambda c: small_subset(c, strong_attacks=False))  # every file, in seconds
    run_cli("test", "--config", str(config), "--data.data_dir", str(cifar_slice), "--data.batch_size", "32",
            "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt"), "--trainer.limit_test_batches", "2",
            "--trainer.enable_progress_bar", "false", cwd=tested_run.parents[1])
    assert {p.name: p.stat().st_mtime_ns for p in tested_run.iterdir()} == first
    assert (tested_run.parent / "version_1" / "results.md").is_file()
    assert not list(tested_run.parent.rglob("*.tmp"))  # atomic writes leave no temporary files behind


def test_sigterm_stops_fit_at_the_current_step_and_says_how_to_resume(cifar_slice, tmp_path):
    args = quick_fit_args(cifar_slice, "--trainer.max_epochs", "2")
    run = _run_with_signal(args, tmp_path, lambda config: None, "SIGTERM", step=11)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    [line] = [line for line in run.stderr.splitlines() if line.startswith("cifar-lightning: stopped")]
    last = Path("lightning_logs/version_0/checkpoints/last.ckpt")
    assert line.startswith(f"cifar-lightning: stopped by SIGTERM at epoch 1, step 11; {last} holds it. Resume: "
                           f"cifar-lightning fit --config ")
    assert line.endswith(" --ckpt_path last")
    assert torch.load(tmp_path / last, weights_only=True)["global_step"] == 11  # not the 9 of the epoch's end

    run_cli(*args, "--ckpt_path", "last", cwd=tmp_path)
    assert torch.load(tmp_path / last, weights_only=True)["global_step"] == 2 * EPOCH_STEPS


def test_resuming_from_best_continues_in_a_new_run_folder(cifar_slice, fitted_run, tmp_path):
    run_dir = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(fitted_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    result = run_cli(*quick_fit_args(cifar_slice, "--trainer.max_epochs", "2", "--ckpt_path",
                                     str(run_dir / "checkpoints" / "best.ckpt")), cwd=tmp_path)
    assert "resuming from best.ckpt, not the run's last.ckpt: this fit goes on in a new run folder" in result.stderr
    assert last.read_bytes() == before
    assert torch.load(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt",
                      weights_only=True)["global_step"] == 2 * EPOCH_STEPS


@TESTED_RUN
def test_a_killed_study_resumes_and_equals_an_uninterrupted_one(cifar_slice, fitted_run, test_config, tested_run,
                                                                tmp_path):
    """Killed (SIGKILL) after the first of its two test batches, then stopped (SIGTERM) before its strong
    attacks, the study resumes twice and writes what the uninterrupted ``tested_run`` wrote."""
    args = ["test", "--config", str(test_config), "--data.data_dir", str(cifar_slice), "--data.batch_size", "128",
            "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt"), "--trainer.enable_progress_bar", "false"]
    run_dir = tmp_path / "lightning_logs" / "version_0"
    killed = _run_with_signal(args, tmp_path, small_subset, "SIGKILL", test_batch=0)  # test_config's edit
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (run_dir / "study_journal").iterdir()) == ["batch0.pt", "fingerprint.txt"]
    assert not (run_dir / "results.csv").exists()

    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", lambda config: small_subset(config, eps=0.02))
    refused = subprocess.run([*CLI, *[str(other) if arg == str(test_config) else arg for arg in args],
                              "--resume_study", "last"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=HANG)
    assert refused.returncode == 2 and "holds the journal of another study" in refused.stderr, refused.stderr[-3000:]

    stopped = _run_with_signal(args + ["--resume_study", "last"], tmp_path, small_subset, "SIGTERM", first=True,
                               test_epoch_end=True)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert (f"stopped by SIGTERM; the study's finished batches and attacks are kept in "
            f"{Path('lightning_logs/version_0/study_journal')} (no results yet). Resume: ") in stopped.stderr
    assert stopped.stderr.rstrip().endswith("--resume_study lightning_logs/version_0")
    assert not (run_dir / "results.csv").exists()

    run_cli(*args, "--resume_study", "lightning_logs/version_0", cwd=tmp_path)
    for name in ("results.csv", "robust_masks.csv", "per_class.csv"):
        assert (run_dir / name).read_text() == (tested_run / name).read_text(), name
    assert "read back from its journal" in (run_dir / "results.md").read_text()
    assert not (run_dir / "study_journal").exists()
    assert sorted(p.name for p in tmp_path.joinpath("lightning_logs").iterdir()) == ["version_0"]


WEIGHTS = str(REPO / "weights" / "improvedcnn_cifar10.ckpt")


@pytest.mark.parametrize("subcommand", ["fit", "test"])
@pytest.mark.parametrize(("setting", "message"), [
    (("--trainer.logger", "false"), "--trainer.logger false leaves the run no run folder"),
    (("--trainer.fast_dev_run", "true"), "--trainer.fast_dev_run True turns the logger and checkpoints off"),
    (("--trainer.strategy", "ddp_spawn"), "strategy=ddp_spawn starts its processes with multiprocessing"),
])
def test_settings_that_leave_a_run_no_folder_or_lose_its_errors_are_refused(capsys, cifar_slice, tmp_path, monkeypatch, subcommand,
                                                          setting, message):
    monkeypatch.chdir(tmp_path)
    checkpoint = ["--ckpt_path", WEIGHTS] if subcommand == "test" else []
    line = cli_error(capsys, subcommand, "--config", str(CONFIG), "--data.data_dir", str(cifar_slice), *checkpoint,
                     *setting)
    assert message in line and "Fix: " in line
    assert list(tmp_path.iterdir()) == []  # nothing written: no config.yaml, no checkpoints folder


@TESTED_RUN
def test_resume_study_is_refused_where_there_is_nothing_to_resume(capsys, cifar_slice, tested_run, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIG), "--data.data_dir", str(cifar_slice), "--ckpt_path", WEIGHTS]
    assert "--resume_study is for test; fit has --ckpt_path last" in cli_error(capsys, "fit", *args,
                                                                               "--resume_study", "last")
    assert "--resume_study last: no run in lightning_logs has an interrupted study" in cli_error(
        capsys, "test", *args, "--resume_study", "last")
    assert f"--resume_study {tested_run}: finished there" in cli_error(capsys, "test", *args,
                                                                       "--resume_study", str(tested_run))


def test_default_root_dir_moves_the_runs_folder(cifar_slice, tmp_path):
    run_cli(*quick_fit_args(cifar_slice, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                            "--trainer.default_root_dir", "elsewhere"), cwd=tmp_path)
    assert (tmp_path / "elsewhere" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_a_command_line_model_option_the_checkpoint_replaces_is_refused(capsys, cifar_slice):
    line = cli_error(capsys, "test", "--config", str(CONFIG), "--data.data_dir", str(cifar_slice), "--ckpt_path",
                     WEIGHTS, "--model.network.init_args.dropout", "0.2")
    assert "--model.network.init_args.dropout=0.2 differs from the checkpoint's 0.5" in line
    assert "Fix: leave --model.network.init_args.dropout out" in line


def test_a_refused_data_folder_leaves_no_run_folder(capsys, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.npz", "test.npz"):
        (data / name).write_bytes(b"not an archive")
    monkeypatch.chdir(tmp_path)
    assert "is truncated or not an npz archive" in cli_error(capsys, *quick_fit_args(data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_full_disk_stops_with_one_line_and_leaves_only_whole_files(capsys, cifar_slice, tmp_path, monkeypatch):
    import errno

    from cifar_lightning.cli import main

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "fsync", disk_full)  # every atomic write fails just before its rename
    with pytest.raises(SystemExit) as exit_:
        main(quick_fit_args(cifar_slice, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"))
    assert exit_.value.code == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cifar-lightning: error:")]
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert line.startswith(f"cifar-lightning: error: could not write {checkpoints.relative_to(tmp_path)}")
    assert ": No space left on device. Every file written before is whole" in line
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []  # no partial checkpoint, no temporary file
