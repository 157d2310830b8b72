"""Checkpoints of the project's runs: checked against the model, found again to resume, trimmed to share.

Reading them (and model files from elsewhere), safely, is ``loading.py``'s job.
"""

from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from cifar_lightning.files import save_atomic

LAST = "last.ckpt"
# What a shipped weights file keeps: the weights and what describes them, no optimizer, loop or callback state.
WEIGHTS_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "pytorch-lightning_version", "epoch", "global_step")
RECIPE_DATA_KEYS = ("batch_size", "val_fraction", "split_seed", "augment")  # not the machine's data_dir


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or for another network; the message says how to fix it."""


def check_matches(weights: Mapping[str, torch.Tensor], module: nn.Module, path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``weights`` (name → tensor, as in a ``state_dict``) fit
    ``module`` key for key, shape for shape; the message shows the first mismatches of each kind."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items() if isinstance(t, torch.Tensor)}
    kinds = [[f"missing {name}" for name in expected if name not in found],
             [f"unexpected {name}" for name in found if name not in expected],
             [f"{name} is {found[name]} in the file but {shape} in the model"
              for name, shape in expected.items() if name in found and found[name] != shape]]
    shown = [problem for problems in kinds for problem in problems[:2]]
    hidden = sum(map(len, kinds)) - len(shown)
    if shown:
        raise CheckpointError(
            f"{path} holds weights of another network ({'; '.join(shown)}{f'; and {hidden} more' if hidden else ''}). "
            f"Fix: set --model.network.class_path (and its init_args) to the network the file was saved from, or "
            f"pass a file of the configured network."
        )


def check_resumable(checkpoint: dict, path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` holds the training state a fit resumes from."""
    if not {"optimizer_states", "loops"} <= checkpoint.keys():
        raise CheckpointError(
            f"{path} holds weights only, not the optimizer and loop state that fit resumes from. Fix: resume "
            f"from a run's last.ckpt (--ckpt_path last), or evaluate these weights with cifar-lightning test."
        )


def latest_last_checkpoint(runs_dir: str | Path) -> Path | None:
    """The most recently written ``version_*/checkpoints/last.ckpt`` under ``runs_dir``, if any."""
    candidates = Path(runs_dir).glob(f"version_*/checkpoints/{LAST}")
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


def weights_only(checkpoint: dict) -> dict:
    """``checkpoint`` as a file to share: :data:`WEIGHTS_KEYS`, and of the data module's
    hyperparameters those of the recipe (:data:`RECIPE_DATA_KEYS`), which a test run shows."""
    kept = {key: checkpoint[key] for key in WEIGHTS_KEYS if key in checkpoint}
    data = checkpoint.get("datamodule_hyper_parameters", {})
    kept["datamodule_hyper_parameters"] = {key: data[key] for key in RECIPE_DATA_KEYS if key in data}
    return kept


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each local checkpoint whole or not at all (``files.write_atomic``).

    Lightning writes a checkpoint to a temporary file in the system's temporary folder and moves it.
    When that folder is on another filesystem than the run (a tmpfs ``/tmp``, runs on NFS), the move is
    a copy into the checkpoint itself: a full disk or a kill then leaves a truncated ``last.ckpt``.
    Remote paths (``s3://``…) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_atomic(checkpoint, Path(path))
