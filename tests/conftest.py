import os
from pathlib import Path

import pytest
import torch

from tests.helpers import callback_args, quick_fit_args, run_cli, write_config, write_slice

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs a worker per core: each, and every command it starts, takes one thread, since
    # two processes of two threads each on two cores run many times slower than one of two.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """A data folder of 640 train (576/64 train/val) and 256 test images."""
    return write_slice(tmp_path_factory.mktemp("cifar_slice"), n_train=640, n_test=256)


@pytest.fixture(scope="session")
def fitted_run(cifar_slice, tmp_path_factory) -> Path:
    """The run folder of a 1-epoch `cifar-lightning fit` on the slice (9 steps of 64 images)."""
    workdir = tmp_path_factory.mktemp("fit")
    run_cli(*quick_fit_args(cifar_slice), cwd=workdir)
    return workdir / "lightning_logs" / "version_0"


CHEAP_CHECKS = {"check_images": 16, "square_queries": 200}


CHEAP_CORRUPTIONS = {"images": 32, "severities": [5]}


def small_subset(config: dict, **changes) -> None:
    """The strong attacks on 32 of the slice's 256 test images, with 5 PGD steps, one ε of the sweep
    (2/255), the costly checks on 16 images with Square's 200 queries, the corruptions at severity 5 on 32
    images, and latency runs of 16 images (the numbers tests read take seconds, not minutes); then ``changes``."""
    callback_args(config, "RobustnessEvaluation").update({"subset": 32, "pgd_steps": 5, "eps_sweep": [2 / 255]}
                                                         | CHEAP_CHECKS | changes)
    callback_args(config, "CorruptionEvaluation").update(CHEAP_CORRUPTIONS)
    callback_args(config, "QuantizationEvaluation")["latency_batch_size"] = 16


@pytest.fixture(scope="session")
def test_config(tmp_path_factory) -> Path:
    """The default config, its strong attacks on a small subset (:func:`small_subset`)."""
    return write_config(tmp_path_factory.mktemp("test_config"), small_subset)


# Session fixtures are made per xdist worker: the tests of the costliest share one worker.
TESTED_RUN = pytest.mark.xdist_group("tested_run")


@pytest.fixture(scope="session")
def tested_run(cifar_slice, fitted_run, test_config, tmp_path_factory) -> Path:
    """The run folder of `cifar-lightning test` (all default callbacks) on the fitted checkpoint. A test that
    uses it is in the xdist group ``TESTED_RUN``, so one worker makes it, once."""
    workdir = tmp_path_factory.mktemp("test")
    run_cli("test", "--config", str(test_config), "--data.data_dir", str(cifar_slice), "--data.batch_size", "128",
            "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt"), "--trainer.enable_progress_bar", "false",
            cwd=workdir)
    return workdir / "lightning_logs" / "version_0"
