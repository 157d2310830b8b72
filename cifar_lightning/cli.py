"""The ``cifar-lightning`` command: LightningCLI with fit / validate / test / predict."""

import sys

import torch
from lightning.pytorch.cli import LightningCLI

from cifar_lightning.data import CIFAR10DataError, CIFAR10DataModule
from cifar_lightning.module import ClassifierModule, NonFiniteLossError

# Errors whose message already says what is wrong and how to fix it: no traceback for these.
USER_ERRORS = (CIFAR10DataError, NonFiniteLossError)


class CifarLightningCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        """AMP (16-mixed) where it pays, on CUDA; 32-bit elsewhere, unless the user chose."""
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        if trainer.precision is None:
            on_cuda = torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda")
            trainer.precision = "16-mixed" if on_cuda else "32-true"


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
