"""The one way the project writes a file: whole or not at all."""

import io
import os
from pathlib import Path

import torch


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename, so that a
    crash or a full disk never leaves half a file, and a file already at ``path`` stays whole until
    the new one replaces it. On failure the temporary file is removed and the error re-raised.

    The temporary name ends in ``.tmp``; the rename is atomic because it stays on one filesystem.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            # On disk before the rename: else a power cut could leave the new name with no data.
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as err:  # named after the file it was for, not the temporary one
        temporary.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save(obj, path)``, written whole or not at all (:func:`write_atomic`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())
