"""The real TensorBoard server over a finished fit and test run serves what the README promises."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

TENSORBOARD = Path(sys.executable).with_name("tensorboard")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(fitted_run, tested_run, tmp_path_factory):
    """``get(path)`` on a tensorboard server on 127.0.0.1 over the two runs, named ``fit`` and ``test``."""
    logdir = tmp_path_factory.mktemp("logdir")
    for name, run in (("fit", fitted_run), ("test", tested_run)):
        shutil.copytree(run, logdir / name, ignore=shutil.ignore_patterns("checkpoints"))
    port = _free_port()
    server = subprocess.Popen([str(TENSORBOARD), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                               "--load_fast", "false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.read()

    try:
        deadline = time.monotonic() + 90
        while True:  # until the server answers and has read both runs' scalars
            try:
                if {"fit", "test"} <= set(json.loads(get("/data/plugin/scalars/tags"))):
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "tensorboard did not serve the runs"
            time.sleep(0.5)
        yield lambda path: json.loads(get(path)) if path.startswith("/data/plugin") and "individual" not in path \
            else get(path)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _query(**params: str) -> str:
    return urllib.parse.urlencode(params)


def test_scalars_tab_serves_train_val_and_test_curves(dashboard):
    tags = dashboard("/data/plugin/scalars/tags")
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr-AdamW"} <= set(tags["fit"])
    assert {"test/acc", "test/fp32/clean/acc", "test/fp32/fgsm/acc", "test/fp32/fgsm/jpeg_q30/acc",
            "test/int8_dynamic/fgsm/acc", "test/int8_static/clean/agreement"} <= set(tags["test"])
    [(_, step, images)] = dashboard(f"/data/plugin/scalars/scalars?{_query(run='test', tag='test/fp32/images')}")
    assert images == 256


def test_images_tab_serves_the_figures_as_png(dashboard):
    tags = dashboard("/data/plugin/images/tags")
    assert {"test/sample", "test/samples_grid", "test/eps_curve"} <= set(tags["test"])
    [entry] = dashboard(f"/data/plugin/images/images?{_query(run='test', tag='test/eps_curve', sample='0')}")
    png = dashboard(f"/data/plugin/images/individualImage?{entry['query']}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_tab_serves_the_results_tables(dashboard):
    assert "test/results/text_summary" in dashboard("/data/plugin/text/tags")["test"]
    [entry] = dashboard(f"/data/plugin/text/text?{_query(run='test', tag='test/results/text_summary')}")
    assert "Summary" in entry["text"] and "int8_dynamic" in entry["text"] and "non-adaptive attacker" in entry["text"]


def test_hparams_tab_is_active(dashboard):
    plugins = dashboard("/data/plugins_listing")
    assert all(plugins[name]["enabled"] for name in ("scalars", "images", "text", "hparams"))
