"""Checkpoints from disk: loaded safely, checked against the model, and found again to resume.

Every checkpoint is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, so a file whose pickle would run code is refused instead of executed.
"""

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

LAST = "last.ckpt"
# What a shipped weights file keeps: the weights and what describes them, no optimizer, loop or callback state.
WEIGHTS_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "pytorch-lightning_version", "epoch", "global_step")
RECIPE_DATA_KEYS = ("batch_size", "val_fraction", "split_seed", "augment")  # not the machine's data_dir


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or for another network; the message says how to fix it."""


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at ``path`` as a dict with a ``state_dict``, loaded on the CPU, weights only."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {problem}. Fix: pass the path of a .ckpt file, e.g. "
                              f"lightning_logs/version_0/checkpoints/best.ckpt, or --ckpt_path last.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        # torch.save writes a zip archive; an intact one whose pickle is refused holds code.
        if isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects that would run code when loaded, not only "
                f"weights ({(refused or ['weights_only=True'])[0]}). Fix: use a checkpoint saved by this project "
                f"(cifar-lightning fit), or, if you trust its source, re-save its state_dict with torch.save."
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint; it may be truncated ({str(err).splitlines()[0]}). "
                              f"Fix: pass another checkpoint, e.g. the run's last.ckpt or best.ckpt.") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no `state_dict` in it). Fix: pass a .ckpt "
                              f"file written by cifar-lightning fit.")
    broken = [name for name, tensor in checkpoint["state_dict"].items()
              if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise CheckpointError(f"{path} holds NaN or infinite weights ({shown}): the run that saved them diverged. "
                              f"Fix: pass a checkpoint with finite weights, e.g. that run's best.ckpt.")
    return checkpoint


def check_matches(checkpoint: dict, module: nn.Module, path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint``'s weights fit ``module`` key for key, shape for shape."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items() if isinstance(t, torch.Tensor)}
    problems = [f"missing {name}" for name in expected if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in expected]
    problems += [f"{name} is {found[name]} in the checkpoint but {shape} in the model"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(
            f"{path} holds weights of another network ({shown}). Fix: pass a checkpoint of the configured "
            f"network, or set --model.network to the network the checkpoint was trained with."
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
