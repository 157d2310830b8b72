"""The ``cifar-lightning`` command: LightningCLI with fit / validate / test / predict."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cifar_lightning.checkpoints import (
    LAST,
    CheckpointError,
    check_matches,
    check_resumable,
    latest_last_checkpoint,
    load_checkpoint,
)
from cifar_lightning.data import CIFAR10DataError, CIFAR10DataModule
from cifar_lightning.module import ClassifierModule, NonFiniteLossError


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


# Errors whose message already says what is wrong and how to fix it: no traceback for these.
USER_ERRORS = (CIFAR10DataError, CheckpointError, ConfigError, NonFiniteLossError)


@rank_zero_only
def _note(message: str) -> None:
    """A line for the user on stderr, once, however many processes parse the command."""
    print(f"cifar-lightning: {message}", file=sys.stderr)


class CifarLightningCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        """After parsing, and before Lightning reads the checkpoint's hyperparameters: resolve
        ``--ckpt_path last``, refuse an unreadable or unsafe checkpoint, and resume a fit in place."""
        super().parse_arguments(parser, args)
        self._checkpoint = None
        subcommand = self.config.subcommand
        config = self.config[subcommand]
        runs_dir = self._runs_dir(config.trainer)
        if config.ckpt_path == "last":
            config.ckpt_path = self._latest_last_checkpoint(runs_dir, subcommand)
        if config.ckpt_path:
            self._checkpoint = load_checkpoint(config.ckpt_path)
            if subcommand == "fit":
                check_resumable(self._checkpoint, config.ckpt_path)
                self._resume_in_place(config.trainer, runs_dir, Path(config.ckpt_path))

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand].trainer
        if trainer.precision is None:
            # AMP (16-mixed) where it pays, on CUDA; 32-bit elsewhere (CPU bf16 autocast is many times slower).
            on_cuda = torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda")
            trainer.precision = "16-mixed" if on_cuda else "32-true"

    @staticmethod
    def _runs_dir(trainer) -> Path:
        """The folder the logger makes ``version_N`` run folders in (``lightning_logs`` by default)."""
        init_args = getattr(trainer.logger, "init_args", None)
        if init_args is not None and init_args.get("save_dir") is not None:
            return Path(init_args.save_dir) / (init_args.get("name") or "")
        return Path(trainer.default_root_dir or ".") / "lightning_logs"

    @staticmethod
    def _latest_last_checkpoint(runs_dir: Path, subcommand: str) -> str | None:
        found = latest_last_checkpoint(runs_dir)
        if found is not None:
            _note(f"--ckpt_path last is {found}")
            return str(found)
        if subcommand != "fit":
            raise CheckpointError(f"--ckpt_path last: no {runs_dir}/version_*/checkpoints/{LAST}. Fix: pass the "
                                  f"path of a checkpoint, e.g. weights/improvedcnn_cifar10.ckpt.")
        _note(f"--ckpt_path last: no {runs_dir}/version_*/checkpoints/{LAST} yet; starting a new run")
        return None

    def _resume_in_place(self, trainer, runs_dir: Path, checkpoint: Path) -> None:
        """Resuming a run of this logger continues in its own ``version_N`` folder, so its
        ModelCheckpoint keeps its best score and its TensorBoard curves continue where they stopped.
        The run's config.yaml is kept; the resumed run's config is saved beside it."""
        run_dir = checkpoint.resolve().parent.parent
        init_args = getattr(trainer.logger, "init_args", None)
        if init_args is None or "version" not in init_args or run_dir.parent != runs_dir.resolve():
            return
        init_args.version = run_dir.name
        resumes = 1
        while (run_dir / f"config.resume{resumes}.yaml").exists():
            resumes += 1
        self.save_config_kwargs["config_filename"] = f"config.resume{resumes}.yaml"

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # The classes validate their arguments, naming the field; jsonargparse wraps that error in
            # its own for values inside lists and unions, so report the innermost one.
            while isinstance(err.__cause__, ValueError):
                err = err.__cause__
            raise ConfigError(f"invalid configuration: {err}") from None

    def _check_checkpoint(self) -> None:
        """Refuse a checkpoint of another network before the run starts, and make Lightning load it
        weights-only too."""
        config = self.config_init[self.subcommand]
        if self._checkpoint is not None:
            check_matches(self._checkpoint, self.model, config.ckpt_path)
            self._checkpoint = None  # Lightning loads it again to restore it; free this copy
        if "weights_only" in config:
            config.weights_only = True

    before_fit = before_validate = before_test = before_predict = _check_checkpoint


def main(args: list[str] | None = None) -> None:
    try:
        CifarLightningCLI(
            ClassifierModule,
            CIFAR10DataModule,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
        )
    except USER_ERRORS as err:
        print(f"cifar-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
