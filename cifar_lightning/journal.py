"""The study's journal: each finished unit of work on disk, so that a killed study resumes where it stopped.

A unit is a test batch (what ``Study.update`` made of it) or one attack member of the strong
attacks on one batch of the subset (its adversarial images). Each is one file, written
atomically when the unit is done; a resumed study reads the units back instead of computing
them again. Every unit is a deterministic function of its inputs (attacks seed their own random
starts), so a resumed study's numbers equal an uninterrupted one's.

The journal belongs to one study: its ``fingerprint`` (weights, data, attacks, models under test)
is written first, and a journal with another fingerprint is refused, never mixed in.
"""

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from cifar_lightning.errors import ConfigError
from cifar_lightning.files import save_atomic, write_atomic

T = TypeVar("T")
FOLDER = "study_journal"
_FINGERPRINT = "fingerprint.txt"


class StudyInterrupted(Exception):
    """The study stopped between two units of work, on request (a SIGTERM); the journal keeps what is done."""


class Journal:
    """Finished units by key, in ``folder`` (None: a journal that remembers nothing, for plain runs).

    Args:
        folder: where the units are kept, e.g. ``lightning_logs/version_N/study_journal``.
        stop_requested: asked before each unit is started; True stops the study there
            (:class:`StudyInterrupted`).
    """

    def __init__(self, folder: Path | None = None, stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.folder, self.stop_requested = folder, stop_requested
        self.replayed = 0

    def open(self, fingerprint: str) -> None:
        """Start the journal of the study ``fingerprint``, or continue the one in the folder if it is that study's."""
        if self.folder is None:
            return
        found = self.folder / _FINGERPRINT
        if found.is_file() and found.read_text() != fingerprint:
            raise ConfigError(f"{self.folder} holds the journal of another study (other weights, data or settings), "
                              f"so it cannot be resumed with this one. Fix: run the interrupted study's own command, "
                              f"or start a new run without --resume_study.")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(found, fingerprint.encode())

    def unit(self, key: str, compute: Callable[[], T]) -> tuple[T, float]:
        """``compute()`` and the seconds it took; read back from the folder when a run before did it."""
        path = None if self.folder is None else self.folder / f"{key.replace('/', '__')}.pt"
        if path is not None and path.is_file():
            saved = torch.load(path, weights_only=True)
            self.replayed += 1
            return saved["value"], saved["seconds"]
        if self.stop_requested():
            raise StudyInterrupted(key)
        start = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - start
        if path is not None:
            save_atomic({"value": value, "seconds": seconds}, path)
        return value, seconds

    def remove(self) -> None:
        """Once the study's results are written: its units are in them."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
