"""`cifar-lightning test` with the default callbacks, end to end, single process and DDP."""

import pandas as pd
import pytest

from tests.helpers import CONFIG, run_cli, scalars

DEFENSES = ["gaussian_k3", "jpeg_q30", "median_k3", "tv_w0.1"]
MODELS = ["fp32", "int8_dynamic", "int8_static"]


def test_test_run_logs_every_tag_once(tested_run):
    logged = scalars(tested_run)
    for model in MODELS:
        for tag in ["clean/acc", "fgsm/acc", "fgsm/attack_success", "images"]:
            assert len(logged[f"test/{model}/{tag}"]) == 1, (model, tag)
        for defense in DEFENSES:
            assert f"test/{model}/fgsm/{defense}/acc" in logged and f"test/{model}/clean/{defense}/acc" in logged
        assert logged[f"test/{model}/images"] == [256]
    assert "test/fp32/fgsm_eps0.0627/tv_w0.1/acc" in logged  # the ε sweep, with defenses
    assert "test/fp32/clean/acc_class/ship" in logged
    assert logged["summary/int8_dynamic/size_mb"] == [pytest.approx(6.72, abs=0.05)]  # HPARAMS tab metrics
    assert logged["test/fp32/clean/acc"] == pytest.approx(logged["test/acc"])  # callback == LightningModule


def test_results_table_matches_the_scalars(tested_run):
    logged = scalars(tested_run)
    table = pd.read_csv(tested_run / "results.csv")
    assert set(table.model) == set(MODELS)
    for row in table.itertuples():
        assert row.acc == pytest.approx(logged[f"test/{row.model}/{row.input}/acc"][0], abs=1e-6)
    summary = pd.read_csv(tested_run / "summary.csv").set_index("model")
    assert list(summary.index) == MODELS
    assert summary.loc["fp32", "size_mb"] == pytest.approx(13.02, abs=0.05)
    assert summary.loc["int8_dynamic", "size_mb"] == pytest.approx(6.72, abs=0.05)
    for model in MODELS:
        assert summary.loc[model, "jpeg_q30_recovery"] == pytest.approx(logged[f"test/{model}/fgsm/jpeg_q30/acc"][0])
    markdown = (tested_run / "results.md").read_text()
    assert "non-adaptive attacker" in markdown and "## Wall time per stage" in markdown


def test_figures_are_written_and_logged(tested_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("sample", "eps_curve", "samples_grid"):
        assert (tested_run / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tested_run), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {"test/sample", "test/eps_curve", "test/samples_grid"} <= set(events.Tags()["images"])
    assert any(tag.startswith("test/results") for tag in events.Tags()["tensors"])


def test_ddp_test_run_counts_each_image_once_and_matches_one_process(cifar_slice, fitted_run, tested_run, tmp_path):
    run_cli("test", "--config", str(CONFIG), "--data.data_dir", str(cifar_slice), "--data.batch_size", "100",
            "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt"), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            cwd=tmp_path)
    ddp_run = tmp_path / "lightning_logs" / "version_0"
    assert not (tmp_path / "lightning_logs" / "version_1").exists()
    ddp, single = scalars(ddp_run), scalars(tested_run)
    for model in MODELS:
        assert ddp[f"test/{model}/images"] == [256]  # 2 ranks × uneven shards (100 + 28 each), no repeats
    for tag in ("clean/acc", "fgsm/acc", "fgsm/attack_success", "fgsm/median_k3/acc"):
        assert ddp[f"test/fp32/{tag}"] == pytest.approx(single[f"test/fp32/{tag}"], abs=1e-6), tag
    assert (ddp_run / "results.csv").is_file() and (ddp_run / "samples_grid.png").is_file()
