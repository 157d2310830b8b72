"""The examples run as written."""

import subprocess
import sys
from pathlib import Path

from tests.helpers import write_slice

ROOT = Path(__file__).resolve().parents[1]


def test_the_evaluate_example_runs_and_writes_a_run_folder(tmp_path):
    data = write_slice(tmp_path / "data", n_train=512, n_test=64)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "evaluate_a_model.py"), "--weights",
                             str(ROOT / "weights" / "improvedcnn_cifar10.ckpt"), "--data_dir", str(data),
                             "--images", "64"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Strongest attack at 8/255 leaves" in result.stdout and "of 6 images" in result.stdout
    assert (tmp_path / "lightning_logs" / "version_0" / "results.csv").is_file()
