"""Helpers shared by the tests: data slices, the entry point, TensorBoard event files."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = Path(os.environ.get("CIFAR10_DIR", Path(__file__).resolve().parents[2] / "shared" / "cifar10"))
CLI = [str(Path(sys.executable).with_name("cifar-lightning"))]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
# Seconds after which a command of a test counts as hung: a guard, not a speed limit, so that a loaded
# machine (a study of the slice takes about 2 minutes idle) never fails a good run.
HANG = 1800


def write_slice(folder: Path, n_train: int, n_test: int) -> Path:
    """train.npz/test.npz with the first images of the real copy (random images if it is absent). Like the
    real copy's, the random images of a split are the same whatever its size: a slice's first n test images
    are any larger slice's."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        if (SHARED_CIFAR10 / f"{split}.npz").is_file():
            with np.load(SHARED_CIFAR10 / f"{split}.npz") as full:
                images, labels = full["images"][:n], full["labels"][:n]
        else:  # one stream per split and array: a prefix of each does not depend on n
            images = np.random.default_rng(2 * seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            labels = np.random.default_rng(2 * seed + 1).integers(0, 10, n, dtype=np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


def run_cli(*args: str, cwd: Path, timeout: float = HANG,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``cifar-lightning`` entry point (with ``env`` added to the environment); fail with
    its output if it fails."""
    result = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=None if env is None else os.environ | env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def cli_error(capsys, *args: str) -> str:
    """Run the entry point in this process; it must exit 2 with one error line and no traceback."""
    import pytest

    from cifar_lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cifar-lightning: error:")]
    return line


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: the kind of code a crafted checkpoint hides."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def write_config(folder: Path, edit) -> Path:
    """The default config changed by ``edit(config dict)``, saved as ``folder/config.yaml``."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    edit(config)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def callback_args(config: dict, class_name: str, **has) -> dict:
    """The init_args of the config's callback of that class (and with those init_args), to read or change."""
    [found] = [c["init_args"] for c in config["trainer"]["callbacks"]
               if c["class_path"].endswith(f".{class_name}") and has.items() <= c["init_args"].items()]
    return found


def quick_fit_args(data_dir: Path, *extra: str, config: Path = CONFIG) -> list[str]:
    """`fit` with the default config (or ``config``) on a slice: one short epoch, no progress bar."""
    return ["fit", "--config", str(config), "--data.data_dir", str(data_dir), "--data.batch_size", "64",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", *extra]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """All scalar series of the TensorBoard event files in ``log_dir``, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class SignalAt(L.Callback):
    """Sends ``signal_name`` (SIGKILL, SIGTERM) to its own process once training reaches global step
    ``step`` (fit), test batch ``test_batch`` has ended, or the test epoch ends (``test_epoch_end``: listed
    first, before the strong attacks run): a kill at an exact moment. Listed last in a config, it runs
    after every other callback's hook. The entry point finds it with ``env=TESTS_IMPORTABLE``."""

    def __init__(self, signal_name: str, step: int | None = None, test_batch: int | None = None,
                 test_epoch_end: bool = False) -> None:
        self.signal, self.step, self.test_batch = getattr(signal, signal_name), step, test_batch
        self.test_epoch_end = test_epoch_end

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.test_epoch_end:
            os.kill(os.getpid(), self.signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.test_batch:
            os.kill(os.getpid(), self.signal)


TESTS_IMPORTABLE = {"PYTHONPATH": str(REPO)}  # the entry point can then load tests.helpers.SignalAt
