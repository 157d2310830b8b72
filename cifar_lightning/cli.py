"""The ``cifar-lightning`` command: LightningCLI with fit / validate / test / predict.

``--ckpt_path`` takes a Lightning checkpoint, which Lightning restores, or a model file from outside
(``loading.py``: a state_dict or safetensors file of ``--model.network``, a torch.export program or a
TorchScript file), which the command puts into the module before the run; a fit from a state_dict
starts a new run from its weights.
"""

import errno
import logging
import re
import shlex
import signal
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from callbacks.checkpointing import LastCheckpoint
from cifar_lightning.checkpoints import LAST, CheckpointError, check_matches, check_resumable, latest_last_checkpoint
from cifar_lightning.data import CIFAR10DataError, CIFAR10DataModule
from cifar_lightning.errors import ConfigError
from cifar_lightning.journal import FOLDER as JOURNAL
from cifar_lightning.journal import StudyInterrupted
from cifar_lightning.loading import LIGHTNING, load_network, read_model_file
from cifar_lightning.module import ClassifierModule, NonFiniteLossError

# Errors whose message already says what is wrong and how to fix it: no traceback for these.
USER_ERRORS = (CIFAR10DataError, CheckpointError, ConfigError, NonFiniteLossError)

# A write that failed for want of room (a full disk, a quota, a file size limit).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# The loops each subcommand runs: a limit of 0 batches on one of them would run nothing, then exit 0.
_LOOPS = {"fit": {"train": "training", "val": "validation"}, "validate": {"val": "validation"},
          "test": {"test": "test"}, "predict": {"predict": "prediction"}}


@rank_zero_only
def _note(message: str) -> None:
    """A line for the user on stderr, once, however many processes parse the command."""
    print(f"cifar-lightning: {message}", file=sys.stderr)


def _first_reason(message: str) -> str:
    """jsonargparse's parse error, many lines long, as one: the keys and class paths down to the first
    reason, without the other subtypes of a union and the value it was given."""
    names = []
    for line in message.splitlines():
        line = line.strip().removeprefix("- ")
        if found := re.fullmatch(r"Parser key \"(.+?)\":(.*)|Problem with given class_path '(.+)':", line):
            names.append(found[1] or found[3])
            line = (found[2] or "").strip()
        if line and not line.startswith(("Does not validate against any of the Union", "Subtypes:", "Errors:")):
            return ": ".join([*names, line.rstrip(".")])
    return ": ".join(names)


def _check_trainer(trainer, subcommand: str) -> None:
    """Refuse trainer values that would make Lightning run nothing (and exit 0), divide by zero mid-run, or
    run the network at a precision the project cannot."""
    for loop, batches in _LOOPS[subcommand].items():
        if trainer[f"limit_{loop}_batches"] == 0:
            raise ConfigError(f"invalid configuration: Trainer: limit_{loop}_batches=0 leaves {subcommand} no "
                              f"{batches} batch to run. Fix: a count of batches (2 or more), a fraction such as 0.1, "
                              f"or leave it out for all of them.")
    # Precisions that hold the whole network in 16 bits (Transformer Engine too: bf16 or fp16 weights). The
    # images (CIFAR10DataModule.on_after_batch_transfer), attacks, defenses and int8 copies are float32, so
    # each subcommand would stop at its first batch with a dtype traceback. With the images cast too, a
    # 16-true fit reached a NaN loss at step 2 (no loss scaler; AdamW's eps=1e-8 is 0 in float16) and a
    # bf16-true fit ran 11x slower than 32-true on a 2-core CPU.
    weights_dtype = {"16-true": "float16", "bf16-true": "bfloat16", "transformer-engine": "bfloat16",
                     "transformer-engine-float16": "float16"}.get(str(trainer.precision))
    if weights_dtype is not None:
        raise ConfigError(f"invalid configuration: Trainer: precision={trainer.precision} holds the network's weights "
                          f"in {weights_dtype}, which this project cannot run: its images, attacks, defenses and "
                          f"int8 copies are float32. Fix: 32-true, or 16-mixed (AMP) on CUDA; bf16-mixed and "
                          f"64-true work too.")
    # These start the processes with multiprocessing, which hands an error back as another process's
    # traceback: a bad value found mid-run (a subset larger than the test set) would lose its one line.
    strategy = str(trainer.strategy)
    if any(launcher in strategy for launcher in ("spawn", "fork", "notebook")):
        raise ConfigError(f"invalid configuration: Trainer: strategy={strategy} starts its processes with "
                          f"multiprocessing, which this command does not support. Fix: --trainer.strategy ddp (the "
                          f"same processes, each started as a command).")
    if subcommand != "fit":
        return
    for name in ("max_epochs", "max_steps"):
        if trainer[name] == 0:
            raise ConfigError(f"invalid configuration: Trainer: {name}=0 leaves fit nothing to train. Fix: a positive "
                              f"number, or -1 for no limit.")
    # Lightning divides by these.
    for name in ("accumulate_grad_batches", "check_val_every_n_epoch", "val_check_interval"):
        if trainer[name] is not None and trainer[name] <= 0:
            raise ConfigError(f"invalid configuration: Trainer: {name}={trainer[name]} must be > 0. Fix: a positive "
                              f"number, or leave it out for Lightning's default.")


def _check_run_folder(trainer) -> None:
    """Every file of a run goes into the logger's ``version_N`` folder; refuse settings that have none."""
    if not trainer.logger:
        raise ConfigError("invalid configuration: --trainer.logger false leaves the run no run folder: its "
                          "checkpoints, config.yaml and results would go into the working folder, and the next such run "
                          "would fail on them. Fix: keep the TensorBoard logger (each run gets lightning_logs/version_N).")
    if trainer.fast_dev_run:
        raise ConfigError(f"invalid configuration: --trainer.fast_dev_run {trainer.fast_dev_run} turns the logger "
                          f"and checkpoints off, leaving the run no run folder. Fix: a short run with a folder of its "
                          f"own: --trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 2 "
                          f"(fit), --trainer.limit_test_batches 2 (test).")


def _move_runs_dir(trainer) -> None:
    """``--trainer.default_root_dir`` moves the runs folder too when the logger's is the config's ``.``:
    Lightning gives it to the logger only when no logger is configured."""
    init_args = getattr(trainer.logger, "init_args", None)
    if trainer.default_root_dir and init_args is not None and init_args.get("save_dir") == ".":
        init_args.save_dir = trainer.default_root_dir


class Stopped(Exception):
    """A run stopped by a signal before its end; the message says what is kept and how to resume."""


class CifarLightningCLI(LightningCLI):
    def init_parser(self, **kwargs):
        # A parse error raises, for main() to report on one line, instead of printing every option's usage.
        return super().init_parser(exit_on_error=False, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--resume_study", type=str | None, default=None,
                            help="test: continue the interrupted study of a run folder (lightning_logs/version_N, "
                                 "or last for the newest one), given the command that started it")

    def parse_arguments(self, parser, args) -> None:
        """After parsing, and before Lightning seeds and reads the checkpoint's hyperparameters: refuse a
        seed or runs folder that cannot work, resolve ``--ckpt_path last``, refuse a missing, unreadable or
        unsafe model file, and resume a fit in place."""
        super().parse_arguments(parser, args)
        self._model_file = None
        self._given = [arg for arg in (sys.argv[1:] if args is None else args) if isinstance(arg, str)]
        subcommand = self.config.subcommand
        config = self.config[subcommand]
        if not 0 <= config.seed_everything < 2**32:  # numpy's range; a bool (true: a random seed) is 0 or 1
            raise ConfigError(f"invalid configuration: seed_everything={config.seed_everything} must be in "
                              f"[0, 2**32), e.g. 0")
        _check_run_folder(config.trainer)
        _move_runs_dir(config.trainer)
        runs_dir = self._runs_dir(config.trainer)
        file = next((folder for folder in (runs_dir, *runs_dir.parents) if folder.is_file()), None)
        if file is not None:
            raise ConfigError(f"invalid configuration: runs are written into {runs_dir}, but {file} is a file. Fix: "
                              f"point --trainer.logger.init_args.save_dir (or --trainer.default_root_dir) at a folder.")
        if config.resume_study is not None:
            self._resume_study(config, runs_dir, subcommand)
        if config.ckpt_path == "last":
            config.ckpt_path = self._latest_last_checkpoint(runs_dir, subcommand)
        if config.ckpt_path:
            self._model_file = read_model_file(config.ckpt_path)
            if subcommand == "fit" and self._model_file.format == LIGHTNING:
                check_resumable(self._model_file.content, config.ckpt_path)
                self._resume_in_place(config.trainer, runs_dir, Path(config.ckpt_path))
            elif subcommand == "fit" and self._model_file.is_program:
                raise CheckpointError(f"fit trains --model.network, and {config.ckpt_path} is a "
                                      f"{self._model_file.format} file: a fixed program, no network to train. Fix: "
                                      f"evaluate it with cifar-lightning test, or fit from a state_dict of its "
                                      f"network (with --model.network.class_path set to that network).")
        elif subcommand != "fit":
            raise CheckpointError(f"{subcommand} needs --ckpt_path: without it, it would evaluate an untrained "
                                  f"network. Fix: pass a checkpoint, e.g. weights/improvedcnn_cifar10.ckpt or a run's "
                                  f"best.ckpt, or --ckpt_path last.")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the hyperparameters of the checkpoint, with torch.load; a model file from
        # outside has none, and may be no torch.save file at all.
        if self._model_file is None or self._model_file.format == LIGHTNING:
            before = self.config[self.config.subcommand].model.clone()
            super()._parse_ckpt_path()
            self._refuse_replaced_options(before, self.config[self.config.subcommand].model)

    def _refuse_replaced_options(self, given, restored) -> None:
        """Lightning replaces the model's settings with those the checkpoint was trained with (the
        network its weights fit, the recipe a resumed fit continues). A --model option on the command
        line that this replaces would be ignored without a word: refuse it."""
        for arg in self._given:
            key = arg.removeprefix("--").split("=", 1)[0]
            if not key.startswith("model."):
                continue
            path = key.removeprefix("model.")
            mine, theirs = given.get(path), restored.get(path)
            if mine != theirs:
                raise ConfigError(f"invalid configuration: --{key}={mine} differs from the checkpoint's {theirs}, and "
                                  f"Lightning restores a checkpoint's model settings, so it would be ignored. Fix: leave "
                                  f"--{key} out; to train with it, start a new fit from a state_dict of these weights "
                                  f"(docs/models.md).")

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand].trainer
        _check_trainer(trainer, self.subcommand)
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
        """Resuming a run of this logger from its ``last.ckpt`` continues in its own ``version_N``
        folder, so its ModelCheckpoint keeps its best score and its TensorBoard curves continue where
        they stopped. From another of its checkpoints (``best.ckpt``), the run goes on in a new folder:
        in place it would overwrite the run's ``last.ckpt``, the newer state."""
        run_dir = checkpoint.resolve().parent.parent
        init_args = getattr(trainer.logger, "init_args", None)
        if init_args is None or "version" not in init_args or run_dir.parent != runs_dir.resolve():
            return
        if checkpoint.name != LAST and (checkpoint.parent / LAST).exists():
            _note(f"resuming from {checkpoint.name}, not the run's {LAST}: this fit goes on in a new run folder, "
                  f"so {run_dir.name}/checkpoints/{LAST} is kept")
            return
        self._continue_in(init_args, run_dir)

    def _continue_in(self, logger_args, run_dir: Path) -> None:
        """Log into the existing ``run_dir``; its config.yaml is kept, this run's is saved beside it."""
        logger_args.version = run_dir.name
        resumes = 1
        while (run_dir / f"config.resume{resumes}.yaml").exists():
            resumes += 1
        self.save_config_kwargs["config_filename"] = f"config.resume{resumes}.yaml"

    def _resume_study(self, config, runs_dir: Path, subcommand: str) -> None:
        """``test --resume_study``: continue in the interrupted run's folder, whose journal holds the
        study's finished units (``journal.py``); the journal itself checks it is this study's."""
        if subcommand != "test":
            resume = "--ckpt_path last" if subcommand == "fit" else "nothing to resume"
            raise ConfigError(f"invalid configuration: --resume_study is for test; {subcommand} has {resume}. Fix: "
                              f"leave it out.")
        if config.resume_study == "last":
            journals = sorted(runs_dir.glob(f"version_*/{JOURNAL}"), key=lambda path: path.stat().st_mtime)
            if not journals:
                raise ConfigError(f"invalid configuration: --resume_study last: no run in {runs_dir} has an "
                                  f"interrupted study ({JOURNAL}/). Fix: run the test without --resume_study.")
            run_dir = journals[-1].parent
            _note(f"--resume_study last is {run_dir}")
        else:
            run_dir = Path(config.resume_study)
            if not (run_dir / JOURNAL).is_dir():
                state = "finished" if (run_dir / "results.csv").is_file() else "no interrupted study"
                raise ConfigError(f"invalid configuration: --resume_study {run_dir}: {state} there (no {JOURNAL}/). "
                                  f"Fix: the run folder of the interrupted test (its last line names it), or leave "
                                  f"--resume_study out.")
        init_args = getattr(config.trainer.logger, "init_args", None)
        if init_args is None or "version" not in init_args or run_dir.resolve().parent != runs_dir.resolve():
            raise ConfigError(f"invalid configuration: --resume_study {run_dir} is not a run folder of {runs_dir}, "
                              f"where this test logs. Fix: pass the same --trainer.logger settings as the "
                              f"interrupted run.")
        self._continue_in(init_args, run_dir.resolve())

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except (SIGTERMException, StudyInterrupted):
            raise Stopped(self._stopped(subcommand)) from None

    def _stopped(self, subcommand: str) -> str:
        """What a SIGTERM stopped, what is kept and the command that resumes it."""
        trainer = self.trainer
        run_dir = Path(trainer.log_dir) if trainer.logger is not None else None
        command = ["cifar-lightning", *self._given]
        if subcommand == "fit":
            last = [cb.last_model_path for cb in trainer.checkpoint_callbacks
                    if isinstance(cb, LastCheckpoint) and cb.last_model_path]
            kept = f"{Path(last[0])} holds it" if last else "no last.ckpt was written (no LastCheckpoint callback)"
            resume = shlex.join(_without_option(command, "--ckpt_path") + ["--ckpt_path", "last"])
            return (f"stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; {kept}. "
                    f"Resume: {resume}")
        if subcommand == "test" and run_dir is not None and (run_dir / JOURNAL).is_dir():
            resume = shlex.join(_without_option(command, "--resume_study") + ["--resume_study", str(run_dir)])
            return (f"stopped by SIGTERM; the study's finished batches and attacks are kept in {run_dir / JOURNAL} "
                    f"(no results yet). Resume: {resume}")
        return f"stopped by SIGTERM; {subcommand} has no results. Run it again to redo it."

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # The classes validate their arguments, naming the field; jsonargparse wraps that error in
            # its own for values inside lists and unions, so report the innermost one.
            while isinstance(err.__cause__, ValueError):
                err = err.__cause__
            raise ConfigError(f"invalid configuration: {err}") from None

    def _before_run(self) -> None:
        """Before the run, and before its run folder is made: load and check the data (a refused data
        folder leaves no empty ``version_N`` behind); refuse a Lightning checkpoint of another network,
        and make Lightning restore it weights-only too; or put the model of a file from outside into
        the module, for Lightning to run as it is (a fit starts from its weights)."""
        if isinstance(self.datamodule, CIFAR10DataModule):
            self.datamodule.setup(self.subcommand)  # the trainer's setup then reuses the loaded splits
        config = self.config_init[self.subcommand]
        model_file, self._model_file = self._model_file, None  # free this copy when the run starts
        if model_file is not None and model_file.format == LIGHTNING:
            check_matches(model_file.content["state_dict"], self.model, model_file.path)
        elif model_file is not None:
            self.model.net.model = load_network(model_file, self.model.net.model)
            self.model.loaded_from = str(model_file.path)
            config.ckpt_path = None  # Lightning restores its own checkpoints only
        if "weights_only" in config:
            config.weights_only = True

    before_fit = before_validate = before_test = before_predict = _before_run


def _without_option(args: list[str], option: str) -> list[str]:
    """``args`` without ``option`` (``--x value`` or ``--x=value``)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def _fail(message: str) -> None:
    print(f"cifar-lightning: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _no_advert(record: logging.LogRecord) -> bool:
    """Lightning's advertisement for its cloud logger is none of the project's information."""
    return "litlogger" not in record.getMessage()


def main(args: list[str] | None = None) -> None:
    # The terminal shows the project's information only: not Lightning's advertisement for its cloud
    # logger, nor a deprecation warning that Lightning's own code triggers in torch.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advert)
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    try:
        CifarLightningCLI(
            ClassifierModule,
            CIFAR10DataModule,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
        )
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"cifar-lightning: error: could not write{where}: {err.strerror}. Every file written before is whole "
              f"(each is written to a temporary file, then renamed). Fix: free space there, then resume: fit with "
              f"--ckpt_path last, an interrupted test with --resume_study <its run folder>.", file=sys.stderr)
        sys.exit(1)
    except Stopped as err:
        print(f"cifar-lightning: {err}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)  # the shell's status of a process a SIGTERM ended
    except USER_ERRORS as err:
        _fail(str(err))
    except MisconfigurationException as err:  # Lightning's own checks of its settings
        _fail(f"invalid configuration: {err}")
    except ArgumentError as err:  # the parser's: unknown options, values of the wrong type
        subcommand = [arg for arg in (sys.argv[1:] if args is None else args) if arg in _LOOPS][:1]
        command = " ".join(["cifar-lightning", *subcommand])
        _fail(f"invalid configuration: {_first_reason(str(err))}. Fix: `{command} --help` lists the options and "
              f"their types.")


if __name__ == "__main__":
    main()
