"""Every file the project writes is whole or absent: a write that fails midway (a full disk) leaves
neither half a file nor a temporary one, and the file it was to replace stays as it was."""

import errno
import io
import os

import matplotlib.pyplot as plt
import pytest

from cifar_lightning import files
from cifar_lightning.files import write_atomic
from cifar_lightning.report import Report

ROOM = 100  # bytes the full disk still takes


@pytest.fixture
def full_disk(monkeypatch) -> list[int]:
    """Files opened by ``write_atomic`` take ``ROOM`` bytes, then fail with ENOSPC as a full disk does;
    the list gets the size each had on disk when it failed."""
    partial_sizes = []

    class FullDiskFile(io.FileIO):
        def write(self, data) -> int:
            room = ROOM - self.tell()
            if len(data) <= room:
                return super().write(data)
            super().write(bytes(data[:room]))
            partial_sizes.append(os.path.getsize(self.name))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

    monkeypatch.setattr(files, "open", FullDiskFile, raising=False)
    return partial_sizes


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    (tmp_path / "results.csv").write_bytes(b"old")
    write_atomic(tmp_path / "results.csv", b"new,rows\n" * 50)
    assert (tmp_path / "results.csv").read_bytes() == b"new,rows\n" * 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_a_write_that_fails_midway_leaves_neither_the_file_nor_a_temporary_one(tmp_path, full_disk):
    with pytest.raises(OSError) as error:
        write_atomic(tmp_path / "results.csv", b"x" * (3 * ROOM))
    assert error.value.errno == errno.ENOSPC
    assert full_disk == [ROOM]  # half a file was on disk when the write failed
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_midway_leaves_the_previous_file_untouched(tmp_path, full_disk):
    (tmp_path / "predictions.csv").write_bytes(b"complete previous file\n")
    with pytest.raises(OSError, match="No space left on device"):
        write_atomic(tmp_path / "predictions.csv", b"y" * (3 * ROOM))
    assert full_disk == [ROOM]
    assert (tmp_path / "predictions.csv").read_bytes() == b"complete previous file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


def test_the_report_on_a_full_disk_keeps_the_previous_files_whole(tmp_path, request):
    report = Report()
    report.add_model_info("fp32", size_mb=13.0)
    figure = plt.figure()
    report.write(tmp_path, {"accuracy_bars": figure})
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert set(before) == {"results.csv", "summary.csv", "per_class.csv", "results.md", "accuracy_bars.png"}

    report.add_model_info("fp32", notes="n" * ROOM)  # the new summary.csv is more than the disk takes
    partial_sizes = request.getfixturevalue("full_disk")
    with pytest.raises(OSError, match="No space left on device"):
        report.write(tmp_path, {"accuracy_bars": figure})
    plt.close(figure)
    assert partial_sizes == [ROOM]
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
