"""A run's checkpoint as a weights-only file to share or ship (as `weights/*.ckpt`):

    .venv/bin/python scripts/export_weights.py lightning_logs/version_0/checkpoints/best.ckpt weights/mine.ckpt

It keeps the weights, the module's hyperparameters, the epoch and the data module's recipe
(``checkpoints.weights_only``); `cifar-lightning test --ckpt_path` takes it like any checkpoint.
"""

import argparse
from pathlib import Path

from cifar_lightning.checkpoints import weights_only
from cifar_lightning.files import save_atomic
from cifar_lightning.loading import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    if args.output.exists():
        parser.exit(2, f"export_weights: {args.output} exists; not overwritten. Fix: remove it or pick another name\n")
    save_atomic(weights_only(load_checkpoint(args.checkpoint)), args.output)
    print(f"{args.output}: {args.output.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
