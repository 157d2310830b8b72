"""Model files from disk, each read safely, and the classifier they hold.

The format is told from the file's content, not its suffix:

* a Lightning checkpoint (``cifar-lightning fit``'s ``.ckpt``): Lightning restores it;
* a ``state_dict`` saved with ``torch.save`` (``.pt``/``.pth``), also under a ``state_dict`` or ``model``
  key and with a ``module.``, ``net.``, ``model.`` or ``net.model.`` prefix: loaded into ``--model.network``;
* a safetensors file (the format of model hubs): the same;
* a ``torch.export`` program (``.pt2``) or a TorchScript file: the model itself, no Python class needed.

No Python code in a file runs: ``torch.save`` files are read with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers only), a safetensors file is a JSON header and tensors, and a
``.pt2`` is read with every ``torch.load`` inside ``torch.export.load`` forced to weights only and its
pickled Python objects refused. A TorchScript file holds TorchScript code, which ``torch.jit.load``
compiles and runs in TorchScript's interpreter, not in Python; take one from a source you would take a
model from.
"""

import contextlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.export.pt2_archive.constants import CONSTANTS_DIR, OPAQUE_OBJ_FILENAME_PREFIX

from cifar_lightning.checkpoints import CheckpointError, check_matches
from cifar_lightning.data import CLASSES

LIGHTNING, STATE_DICT, SAFETENSORS, EXPORTED, TORCHSCRIPT = (
    "Lightning checkpoint", "state_dict", "safetensors", "torch.export program", "TorchScript")
# What wrappers put before a network's own weight names: DataParallel and DDP, a LightningModule's
# attribute, this project's ClassifierModule (``net`` is ``Normalized(model)``).
PREFIXES = ("net.model.", "module.", "net.", "model.")
_FORMATS = ("a Lightning .ckpt of cifar-lightning fit, a state_dict saved with torch.save (.pt/.pth), a "
            ".safetensors file, a torch.export program (.pt2) or a TorchScript file")


@dataclass(frozen=True)
class ModelFile:
    """A model file as read (:func:`read_model_file`).

    ``content``: for a Lightning checkpoint the checkpoint (a dict); for a state_dict or safetensors file
    the weights (name → tensor); for a torch.export or TorchScript file the program (an ``nn.Module``
    taking what the model was trained on, (N, 3, 32, 32) images, and returning (N, 10) logits).
    """

    path: Path
    format: str
    content: dict | nn.Module

    @property
    def is_program(self) -> bool:
        return self.format in (EXPORTED, TORCHSCRIPT)

    @property
    def weights(self) -> Mapping[str, Tensor]:
        if self.is_program:
            return self.content.state_dict()
        return self.content["state_dict"] if self.format == LIGHTNING else self.content


class ExportedModule(nn.Module):
    """A ``torch.export`` program as a module: images (N, 3, H, W) → logits (N, classes).

    A program's graph keeps the mode it was exported in (after ``model.eval()``: batch norm on its
    running statistics, no dropout), and ``ExportedProgram.module()`` raises NotImplementedError on
    ``.train()`` and ``.eval()``, which Lightning and the study call on every module. So this keeps a
    flag of its own that changes nothing in the graph; :func:`read_model_file` refuses a program
    exported in training mode, and ``fit`` refuses to train a program. Gradients w.r.t. the input
    flow through the graph as through the network it was exported from.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> "ExportedModule":
        self.training = mode  # not passed on: see the class docstring
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.program(images)


def read_model_file(path: str | Path) -> ModelFile:
    """The model file at ``path`` in any of the formats above, on the CPU; its weights checked finite,
    a program checked to be a CIFAR-10 classifier of (N, 3, 32, 32) images."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {problem}. Fix: pass the path of a model file, e.g. "
                              f"lightning_logs/version_0/checkpoints/best.ckpt, or --ckpt_path last.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), e.g. a copy or download that did not finish. Fix: copy "
                              f"it again, or pass another model file.")
    with path.open("rb") as file:
        head = file.read(9)
    if _is_safetensors(head, size):
        model_file = ModelFile(path, SAFETENSORS, _load_safetensors(path))
    elif (program_format := _program_format(path)) is not None:
        program = _load_torchscript(path) if program_format == TORCHSCRIPT else _load_exported(path)
        _check_program(program, path)
        model_file = ModelFile(path, program_format, program)
    elif _is_lightning(content := _torch_load(path)):
        model_file = ModelFile(path, LIGHTNING, content)
    else:
        model_file = ModelFile(path, STATE_DICT, _weights_of(content, path))
    _check_finite(model_file.weights, path)
    return model_file


def load_checkpoint(path: str | Path) -> dict:
    """The Lightning checkpoint at ``path`` (read by :func:`read_model_file`); any other model file is refused."""
    model_file = read_model_file(path)
    if model_file.format != LIGHTNING:
        raise CheckpointError(f"{path} is a {model_file.format} file, not a Lightning checkpoint. Fix: pass a .ckpt "
                              f"file written by cifar-lightning fit.")
    return model_file.content


def load_network(model_file: ModelFile, network: nn.Module | None) -> nn.Module:
    """The classifier of ``model_file``: ``network`` with the file's weights loaded into it (a Lightning
    checkpoint's too), or the file's program (``network`` unused)."""
    if model_file.is_program:
        return model_file.content
    if network is None:
        raise CheckpointError(f"{model_file.path} is a {model_file.format} file: weights without the network they "
                              f"belong to. Fix: pass the network, e.g. load_model(path, ImprovedCNN()).")
    weights = _without_prefix(dict(model_file.weights), network.state_dict().keys())
    check_matches(weights, network, model_file.path)
    network.load_state_dict(weights)
    return network


def load_model(path: str | Path, network: nn.Module | None = None) -> nn.Module:
    """The classifier in the model file at ``path``, in any of the formats above, for ``evaluate``:
    ``network`` holding the file's weights, or the file's program (then no ``network`` is needed)."""
    return load_network(read_model_file(path), network)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable checkpoint; it may be truncated, or be none of the formats "
                           f"read here ({_first_line(err)}). Fix: pass {_FORMATS}.")


def _refused(path: Path, found: str) -> CheckpointError:
    return CheckpointError(
        f"refused to load {path}: it holds Python objects that would run code when loaded, not only weights "
        f"({found}). Fix: use a checkpoint saved by this project (cifar-lightning fit), or, if you trust its "
        f"source, re-save its state_dict with torch.save."
    )


def _unsupported_global(err: pickle.UnpicklingError) -> str:
    """The line of ``torch.load``'s refusal that names the Python object it would have built."""
    return next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "weights_only=True")


def _is_safetensors(head: bytes, size: int) -> bool:
    # 8 bytes: the little-endian length of the JSON header that follows them; then the tensors' bytes.
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _program_format(path: Path) -> str | None:
    """TORCHSCRIPT or EXPORTED for the zip archives of ``torch.jit.save`` and ``torch.export.save``;
    None for ``torch.save``'s (one ``data.pkl``) and for files that are no zip archive."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(name.endswith("/constants.pkl") for name in names):  # beside the TorchScript code/
                return TORCHSCRIPT
            if any(name.endswith("/archive_format") and archive.read(name) == b"pt2" for name in names):
                return EXPORTED
    except (zipfile.BadZipFile, OSError) as err:
        raise _unreadable(path, err) from None
    return None


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        # torch.save writes a zip archive; an intact one whose pickle is refused holds code.
        if isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            raise _refused(path, _unsupported_global(err)) from None
        raise _unreadable(path, err) from None


def _is_lightning(content: object) -> bool:
    return isinstance(content, dict) and "pytorch-lightning_version" in content \
        and isinstance(content.get("state_dict"), dict)


def _weights_of(content: object, path: Path) -> dict[str, Tensor]:
    """The tensors of a ``torch.save``'d state_dict: the dict itself or, as training scripts save it,
    the dict under its ``state_dict`` or ``model`` key."""
    if isinstance(content, dict):
        content = next((content[key] for key in ("state_dict", "model") if isinstance(content.get(key), dict)),
                       content)
    weights = {name: tensor for name, tensor in content.items() if isinstance(name, str)
               and isinstance(tensor, Tensor)} if isinstance(content, dict) else {}
    if not weights:
        raise CheckpointError(f"{path} holds no weights: it is a torch.save file of a {type(content).__name__} "
                              f"without tensors, not a state_dict. Fix: pass {_FORMATS}.")
    return weights


def _without_prefix(weights: dict[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """``weights`` without the prefix (of :data:`PREFIXES`) that all their names share, if that makes
    more of them names of ``expected``."""
    expected = set(expected)
    candidates = [weights] + [{name.removeprefix(prefix): tensor for name, tensor in weights.items()}
                              for prefix in PREFIXES if all(name.startswith(prefix) for name in weights)]
    return max(candidates, key=lambda candidate: len(candidate.keys() & expected))


def _check_finite(weights: Mapping[str, Tensor], path: Path) -> None:
    broken = [name for name, tensor in weights.items()
              if isinstance(tensor, Tensor) and tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise CheckpointError(f"{path} holds NaN or infinite weights ({shown}): the run that saved them diverged. "
                              f"Fix: pass a checkpoint with finite weights, e.g. that run's best.ckpt.")


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from None


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # Deprecated since torch 2.14, yet still how many models are shared.
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
            return torch.jit.load(path, map_location="cpu")
    except RuntimeError as err:
        raise _unreadable(path, err) from None


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` meanwhile reads weights only, whatever its caller asks: ``torch.export.load``
    asks for ``weights_only=False`` on a .pt2's tensor subclasses and, as a fallback, on its sample inputs."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _load_exported(path: Path) -> ExportedModule:
    with zipfile.ZipFile(path) as archive:
        # torch.export.load unpickles these with pickle.loads.
        opaque = [name for name in archive.namelist() if f"{CONSTANTS_DIR}{OPAQUE_OBJ_FILENAME_PREFIX}" in name]
    if opaque:
        raise _refused(path, f"a pickled object, {opaque[0]}")
    try:
        with _weights_only_loads():
            program = torch.export.load(path)
    except pickle.UnpicklingError as err:
        raise _refused(path, _unsupported_global(err)) from None
    except Exception as err:  # noqa: BLE001 -- torch.export.load fails on a damaged archive with errors of many types
        raise _unreadable(path, err) from None
    return ExportedModule(program.module())


def _check_program(program: nn.Module, path: Path) -> None:
    """Refuse a program that is no CIFAR-10 classifier of (N, 3, 32, 32) batches, or whose logits for an
    image depend on the rest of the batch or vary between calls (saved in training mode)."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    program.eval()
    try:
        with torch.no_grad():
            alone, batch = program(images[:1]), program(images)
    except Exception as err:  # noqa: BLE001 -- the program's own error, of whatever type its code raises
        raise CheckpointError(
            f"{path} fails on a batch of (N, 3, 32, 32) images ({_first_line(err)}). Fix: pass a CIFAR-10 classifier "
            f"of 32×32 RGB images; export a torch.export program with a dynamic batch size, e.g. "
            f"torch.export.export(model, (x,), dynamic_shapes=({{0: torch.export.Dim('batch')}},))."
        ) from None
    classes = len(CLASSES)
    if not isinstance(alone, Tensor) or alone.shape != (1, classes):
        found = tuple(alone.shape) if isinstance(alone, Tensor) else f"a {type(alone).__name__}"
        raise CheckpointError(f"{path} returns {found} for a (1, 3, 32, 32) image, not (1, {classes}) logits. Fix: "
                              f"pass a classifier with {classes} outputs, one per CIFAR-10 class.")
    if not torch.allclose(alone, batch[:1], atol=1e-4):
        raise CheckpointError(f"{path} gives an image other logits in a batch than alone: it was saved in training "
                              f"mode (batch norm on batch statistics, or dropout on). Fix: call model.eval() before "
                              f"torch.export.export or torch.jit.trace, and save it again.")
