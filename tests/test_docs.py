"""Every command of README.md and docs/*.md runs as written (``scripts/check_docs.py``).

The check parses each ``cifar-lightning`` command with ``--print_config`` in one interpreter
through the installed entry point (as ``tests/helpers.CLI`` finds it), so the whole run takes
about 20 s on 2 idle cores. The timeout only catches a hang: it is ten times that and more, so a loaded machine passes.
"""

import os
import subprocess
import sys
from pathlib import Path

from scripts import check_docs

REPO = Path(__file__).resolve().parents[1]
HANG = 600  # seconds: a hang, not a speed limit (about 20 s idle)


def test_every_documented_command_runs_as_written():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_docs.py")], cwd=REPO, capture_output=True,
                            text=True, timeout=HANG, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert " 0 failed" in result.stdout


def test_commands_are_read_with_their_comments_dropped_and_continuations_joined(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```bash", "# a comment line", "make run    # and a comment after", "cifar-lightning test --config a.yaml \\",
        "    --ckpt_path b.ckpt", "```", "```python", "print('not a command')", "```",
        "  ```bash", "  .venv/bin/python scripts/compare_studies.py \"a, b=c/d\"", "  ```"]))
    commands = check_docs.extract(page)
    assert [c.argv for c in commands] == [
        ["make", "run"], ["cifar-lightning", "test", "--config", "a.yaml", "--ckpt_path", "b.ckpt"],
        [".venv/bin/python", "scripts/compare_studies.py", "a, b=c/d"]]
    assert [c.source.rpartition(":")[2] for c in commands] == ["3", "4", "11"]


def _problems(line: str) -> list[str]:
    return check_docs.plan(check_docs.Command("page.md:1", line, line.split())).problems


def test_a_path_a_clone_lacks_fails_and_what_a_documented_command_writes_passes():
    assert _problems("cifar-lightning test --config configs/default.yaml --ckpt_path weights/improvedcnn_cifar10.ckpt") == []
    assert _problems("cifar-lightning test --config configs/default.yaml "
                     "--ckpt_path lightning_logs/version_0/checkpoints/best.ckpt") == []
    assert _problems("cifar-lightning fit --config configs/default.yaml --data.data_dir ../shared/cifar10 "
                     "--ckpt_path last") == []
    # Ignored by git, so never in a clone (lightning_logs/* but the reference runs).
    [problem] = _problems(".venv/bin/python scripts/time_to_accuracy.py lightning_logs/reference_default/fit")
    assert "lightning_logs/reference_default/fit is not in the repository" in problem
    [problem] = _problems("cifar-lightning fit --config configs/missing.yaml")
    assert "configs/missing.yaml" in problem


def test_what_print_config_does_not_check_is_checked():
    [problem] = _problems("cifar-lightning test --config configs/default.yaml --data.data_dir ../shared/cifar10")
    assert "test without --ckpt_path" in problem
    [problem] = _problems(".venv/bin/python scripts/export_weights.py weights/improvedcnn_cifar10.ckpt "
                          "weights/improvedcnn_cifar10_adv.ckpt")
    assert "never overwrites" in problem
    [problem] = _problems("pip install something")
    assert "no check for 'pip'" in problem
