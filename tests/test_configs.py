"""The default config and the LightningCLI features users rely on."""

import yaml

from tests.helpers import CONFIG, callback_args, quick_fit_args, run_cli


def _printed_config(tmp_path, *args):
    return yaml.safe_load(run_cli("fit", "--config", str(CONFIG), *args, "--print_config", cwd=tmp_path).stdout)


def test_default_config_holds_the_seed_recipe(tmp_path):
    config = _printed_config(tmp_path)
    assert config["trainer"]["max_epochs"] == 25
    assert config["model"]["network"]["class_path"] == "cifar_lightning.models.ImprovedCNN"
    assert callback_args(config, "EarlyStopping")["monitor"] == "val/loss"
    best = callback_args(config, "ModelCheckpoint", monitor="val/acc")
    assert best["filename"] == "best" and best["mode"] == "max"
    assert callback_args(config, "LastCheckpoint")["every_n_train_steps"] > 0  # last.ckpt mid-epoch too
    assert callback_args(config, "LearningRateMonitor")
    assert callback_args(config, "RobustnessEvaluation")["eps"] == 0.03
    assert callback_args(config, "QuantizationEvaluation")
    assert config["data"]["val_fraction"] == 0.1


def test_dotted_overrides_reach_the_config(tmp_path):
    config = _printed_config(tmp_path, "--trainer.max_epochs", "1", "--data.batch_size", "256", "--model.lr", "0.01")
    assert (config["trainer"]["max_epochs"], config["data"]["batch_size"], config["model"]["lr"]) == (1, 256, 0.01)


def test_precision_is_32_bit_on_a_cpu_unless_set(cifar_slice, tmp_path):
    args = quick_fit_args(cifar_slice, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2")
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


FAST = CONFIG.with_name("fast.yaml")
ADVERSARIAL = CONFIG.with_name("adversarial.yaml")


def test_fast_and_adversarial_configs_layer_over_the_default(tmp_path):
    fast = _printed_config(tmp_path, "--config", str(FAST))
    assert (fast["model"]["optimizer"], fast["model"]["schedule"], fast["model"]["lr"]) == ("sgd", "onecycle", 0.1)
    assert fast["model"]["adversarial"] == "none" and callback_args(fast, "RobustnessEvaluation")["eps"] == 0.03
    adversarial = _printed_config(tmp_path, "--config", str(ADVERSARIAL))
    assert adversarial["model"]["adversarial"] == "n_fgsm" and adversarial["model"]["val_attack_images"] == 1000
    assert callback_args(adversarial, "ModelCheckpoint", filename="best")["monitor"] == "val/pgd_acc"
    assert callback_args(adversarial, "RobustnessEvaluation")["eps"] == adversarial["model"]["adversarial_eps"]
    assert callback_args(adversarial, "CorruptionEvaluation")["images"] == 1000  # the robust weights' third track


def test_the_tracks_config_runs_robustbenchs_three_tracks_at_their_budgets(tmp_path):
    tracks = _printed_config(tmp_path, "--config", str(CONFIG.with_name("tracks.yaml")))
    robustness = callback_args(tracks, "RobustnessEvaluation")
    assert (robustness["eps"], robustness["l2_eps"]) == (8 / 255, 0.5) and robustness["defenses"] == []
    assert callback_args(tracks, "CorruptionEvaluation")["images"] == 1000
    assert callback_args(tracks, "QuantizationEvaluation")["static"]  # the int8 copies on every track


def test_the_one_cycle_schedule_steps_every_batch_over_the_whole_fit(cifar_slice, tmp_path):
    import torch

    run_cli(*quick_fit_args(cifar_slice, "--config", str(FAST), "--trainer.max_epochs", "2"), cwd=tmp_path)
    checkpoint = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    schedule = checkpoint["lr_schedulers"][0]
    assert schedule["total_steps"] == 2 * 9 and schedule["last_epoch"] == 2 * 9  # per step, the whole fit
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["nesterov"]
