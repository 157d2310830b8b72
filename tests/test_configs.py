"""The default config and the LightningCLI features users rely on."""

import yaml

from tests.helpers import CONFIG, quick_fit_args, run_cli


def _printed_config(tmp_path, *args):
    return yaml.safe_load(run_cli("fit", "--config", str(CONFIG), *args, "--print_config", cwd=tmp_path).stdout)


def test_default_config_holds_the_seed_recipe(tmp_path):
    config = _printed_config(tmp_path)
    assert config["trainer"]["max_epochs"] == 25
    assert config["model"]["network"]["class_path"] == "cifar_lightning.models.ImprovedCNN"
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in config["trainer"]["callbacks"]}
    assert callbacks["EarlyStopping"]["monitor"] == "val/loss"
    assert callbacks["ModelCheckpoint"]["monitor"] == "val/acc" and callbacks["ModelCheckpoint"]["save_last"]
    assert "LearningRateMonitor" in callbacks
    assert config["data"]["val_fraction"] == 0.1


def test_dotted_overrides_reach_the_config(tmp_path):
    config = _printed_config(tmp_path, "--trainer.max_epochs", "1", "--data.batch_size", "256", "--model.lr", "0.01")
    assert (config["trainer"]["max_epochs"], config["data"]["batch_size"], config["model"]["lr"]) == (1, 256, 0.01)


def test_precision_is_32_bit_on_a_cpu_unless_set(cifar_slice, tmp_path):
    args = quick_fit_args(cifar_slice, "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1")
    run_cli(*args, cwd=tmp_path)
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "32-true"


def test_bad_data_dir_exits_with_one_clear_line(tmp_path):
    import subprocess

    from tests.helpers import CLI

    result = subprocess.run([*CLI, *quick_fit_args(tmp_path / "missing")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"cifar-lightning: error: data folder {tmp_path / 'missing'} does not exist" in result.stderr
