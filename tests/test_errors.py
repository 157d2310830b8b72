"""Bad input stops a command before it runs, with one line that names the value, field or file and the
fix (exit 2); and a run's terminal shows the project's information, not the libraries' noise."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.robustness import RobustnessEvaluation
from cifar_lightning.data import CIFAR10DataError, CIFAR10DataModule, load_cifar10
from cifar_lightning.module import ClassifierModule
from cifar_lightning.quantization import quantize_dynamic_linear, quantize_static
from tests.helpers import (
    CLI,
    CONFIG,
    Payload,
    callback_args,
    cli_error,
    quick_fit_args,
    run_cli,
    write_config,
    write_slice,
)

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "improvedcnn_cifar10.ckpt"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Commands run in the test's folder: one that gets as far as a trainer writes its runs there."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("callback", "field", "value", "message"),
    [
        ("RobustnessEvaluation", "eps", -0.1, "RobustnessEvaluation: eps=-0.1 must be in (0, 1] (pixel scale"),
        ("RobustnessEvaluation", "eps", 1.5, "RobustnessEvaluation: eps=1.5 must be in (0, 1] (pixel scale"),
        # an FGSM of budget 0 would run and change no image
        ("RobustnessEvaluation", "eps", 0, "RobustnessEvaluation: eps=0.0 must be in (0, 1]: a budget of 0 attacks "
                                           "nothing (pixel scale"),
        ("RobustnessEvaluation", "eps_sweep", [2 / 255, -0.1], "RobustnessEvaluation: eps_sweep=-0.1 must be in [0, 1] "
                                                              "(pixel scale"),
        ("RobustnessEvaluation", "autoattack", "plus", "RobustnessEvaluation: autoattack='plus' is not an AutoAttack "
                                                     "version; choose standard, apgd, or null for none"),
        ("RobustnessEvaluation", "checks", ["gradients"], "RobustnessEvaluation: checks=['gradients'] has unknown "
                                                         "check 'gradients'; choose from randomised, logits, "
                                                         "zero_gradients, convergence, large_eps, black_box"),
        ("RobustnessEvaluation", "square_queries", 0, "RobustnessEvaluation: square_queries=0 must be an integer >= 1"),
        ("RobustnessEvaluation", "l2_eps", 0, "RobustnessEvaluation: l2_eps=0.0 must be a positive number (L2 length"),
        ("RobustnessEvaluation", "l2_eps", float("nan"), "RobustnessEvaluation: l2_eps=nan must be a positive number"),
        ("GaussianBlur", "kernel_size", 4, "GaussianBlur: kernel_size=4 must be an odd integer >= 3"),
        ("MedianFilter", "kernel_size", 1, "MedianFilter: kernel_size=1 must be an odd integer >= 3"),
        ("JpegCompression", "quality", 0, "JpegCompression: quality=0 must be an integer in 1..95"),
        ("JpegCompression", "quality", 100, "JpegCompression: quality=100 must be an integer in 1..95"),
        ("TotalVariationDenoise", "weight", 0.0, "TotalVariationDenoise: weight=0.0 must be a finite number > 0"),
        ("RobustnessEvaluation", "eps", float("nan"), "RobustnessEvaluation: eps=nan must be in (0, 1]"),  # `.nan`
        # `nan` is text to YAML: the parser refuses it, in one line too
        ("RobustnessEvaluation", "eps", "nan", "trainer.callbacks: callbacks.robustness.RobustnessEvaluation: eps: "
                                               "Expected a <class 'float'>. Got value: nan"),
    ],
)
def test_out_of_range_callback_values_are_refused_naming_the_field(capsys, tmp_path, callback, field, value, message):
    def edit(config):
        if callback == "RobustnessEvaluation":
            callback_args(config, callback)[field] = value
        else:
            [defense] = [d for d in callback_args(config, "RobustnessEvaluation")["defenses"]
                         if d["class_path"].endswith(callback)]
            defense["init_args"][field] = value

    line = cli_error(capsys, "test", "--config", str(write_config(tmp_path, edit)), "--data.data_dir", str(tmp_path),
                      "--ckpt_path", str(WEIGHTS))
    assert line.startswith(f"cifar-lightning: error: invalid configuration: {message}")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--data.val_fraction", "0", "CIFAR10DataModule: val_fraction=0.0 must be in (0, 1)"),
        ("--data.val_fraction", "1", "CIFAR10DataModule: val_fraction=1.0 must be in (0, 1)"),
        ("--data.batch_size", "0", "CIFAR10DataModule: batch_size=0 must be at least 1"),
        ("--model.lr", "-1", "ClassifierModule: lr=-1.0 must be > 0"),
    ],
)
def test_out_of_range_model_and_data_values_are_refused_naming_the_field(capsys, tmp_path, flag, value, message):
    line = cli_error(capsys, "fit", "--config", str(CONFIG), "--data.data_dir", str(tmp_path), f"{flag}={value}")
    assert line.startswith(f"cifar-lightning: error: invalid configuration: {message}")


def test_the_eps_sweeps_0_is_its_clean_point_and_dropped():
    evaluation = RobustnessEvaluation(eps=0.03, eps_sweep=[0.0, 2 / 255, 0.03])
    assert evaluation.suite.eps_sweep == [2 / 255]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.adversarial", "fgsm_rs", "--model.adversarial_eps", "0"],
         "TrainingAttack: eps=0.0 must be in (0, 1]: a budget of 0 attacks nothing (pixel scale"),
        (["--model.adversarial", "pgd", "--model.adversarial_eps", "-0.1"],
         "TrainingAttack: eps=-0.1 must be in (0, 1]"),
        (["--model.val_attack_images", "64", "--model.adversarial_eps", "0"],
         "ClassifierModule: adversarial_eps=0.0 must be > 0 with val_attack_images > 0 (validation attacks of budget 0 "
         "attack nothing), e.g. 0.031 (8/255)"),
    ],
)
def test_an_adversarial_budget_of_0_is_refused_where_it_would_attack(capsys, tmp_path, args, message):
    line = cli_error(capsys, "fit", "--config", str(CONFIG), "--data.data_dir", str(tmp_path), *args)
    assert line.startswith(f"cifar-lightning: error: invalid configuration: {message}")
    assert ClassifierModule(adversarial_eps=0.0).training_attack.method == "none"  # nothing attacks: allowed


def _test_with_checkpoint(capsys, data_dir, checkpoint) -> str:
    return cli_error(capsys, "test", "--config", str(CONFIG), "--data.data_dir", str(data_dir),
                      "--ckpt_path", str(checkpoint))


def test_a_file_that_is_not_a_checkpoint_is_refused(capsys, cifar_slice, tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert "notes.ckpt is not a readable checkpoint" in _test_with_checkpoint(capsys, cifar_slice,
                                                                             tmp_path / "notes.ckpt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.ckpt")  # a state_dict, of no network configured
    line = _test_with_checkpoint(capsys, cifar_slice, tmp_path / "dict.ckpt")
    assert "dict.ckpt holds weights of another network (missing features.0.0.weight" in line
    assert "unexpected weights" in line
    assert "missing.ckpt does not exist" in _test_with_checkpoint(capsys, cifar_slice, tmp_path / "missing.ckpt")
    assert f"checkpoint {tmp_path} is a folder, not a file" in _test_with_checkpoint(capsys, cifar_slice, tmp_path)


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor(capsys, cifar_slice, tmp_path):
    state = ClassifierModule().state_dict()
    name = [key for key, tensor in state.items() if tensor.is_floating_point()][-1]
    state[name][0] = float("nan")
    torch.save({"state_dict": state}, tmp_path / "diverged.ckpt")
    line = _test_with_checkpoint(capsys, cifar_slice, tmp_path / "diverged.ckpt")
    assert f"diverged.ckpt holds NaN or infinite weights ({name})" in line and "best.ckpt" in line


def test_a_truncated_checkpoint_is_refused(capsys, cifar_slice, fitted_run, tmp_path):
    data = (fitted_run / "checkpoints" / "best.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    line = _test_with_checkpoint(capsys, cifar_slice, tmp_path / "cut.ckpt")
    assert "cut.ckpt is not a readable checkpoint; it may be truncated" in line


def test_a_checkpoint_of_another_network_is_refused(capsys, cifar_slice, tmp_path):
    other = ClassifierModule(network=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)))
    torch.save({"state_dict": other.state_dict(), "pytorch-lightning_version": "2.6.0"}, tmp_path / "other.ckpt")
    line = _test_with_checkpoint(capsys, cifar_slice, tmp_path / "other.ckpt")
    assert "other.ckpt holds weights of another network (missing net.model.features.0.0.weight" in line
    assert "--model.network" in line


def test_fit_refuses_to_resume_from_weights_only(capsys, cifar_slice):
    line = cli_error(capsys, "fit", "--config", str(CONFIG), "--data.data_dir", str(cifar_slice),
                      "--ckpt_path", str(WEIGHTS))
    assert "improvedcnn_cifar10.ckpt holds weights only, not the optimizer and loop state" in line
    assert "--ckpt_path last" in line and "cifar-lightning test" in line


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(cifar_slice, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = {"state_dict": ClassifierModule().state_dict(), "payload": Payload(marker)}
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    for subcommand in ("test", "fit"):
        result = subprocess.run([*CLI, subcommand, "--config", str(CONFIG), "--data.data_dir", str(cifar_slice),
                                 "--ckpt_path", str(tmp_path / "crafted.ckpt")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "refused to load" in result.stderr and "would run code" in result.stderr
        assert not marker.exists()
    torch.load(tmp_path / "crafted.ckpt", weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--data.batch_size", "1000"], "CIFAR10DataModule: batch_size=1000 is more than the 576 training "
                                               "images each process gets"),
        (["fit", "--data.val_fraction", "0.0001"], "CIFAR10DataModule: val_fraction=0.0001 of the 640 training "
                                                   "images"),
        (["fit", "--data.data_dir", "a_file"], "data folder a_file is a file, not a folder"),
        (["fit", "--data.data_dir", "a_file", "--data.download", "true"], "data folder a_file is a file, not a folder"),
        (["fit", "--seed_everything", "4294967296"], "seed_everything=4294967296 must be in [0, 2**32)"),
        (["fit", "--trainer.logger.init_args.save_dir", "a_file"], "runs are written into a_file/lightning_logs, "
                                                                   "but a_file is a file"),
        (["test"], "test needs --ckpt_path: without it, it would evaluate an untrained network"),
        (["validate"], "validate needs --ckpt_path"),
        # Lightning's own checks
        (["fit", "--trainer.max_epochs", "-5"], "invalid configuration: `max_epochs` must be a non-negative integer"),
        (["fit", "--trainer.limit_train_batches", "1.5"], "invalid configuration: You have passed invalid value 1.5 "
                                                          "for limit_train_batches"),
        # the parser's
        (["fit", "--trainer.precision", "17"], "invalid configuration: trainer.precision: Expected a typing.Literal"),
        (["fit", "--data.batchsize", "3"], "invalid configuration: unrecognized arguments: --data.batchsize 3. Fix: "
                                           "`cifar-lightning fit --help` lists the options"),
        (["fit", "--config", "missing.yaml"], "invalid configuration: config: File does not exist"),
    ],
)
def test_bad_values_files_and_folders_are_refused_in_one_line(capsys, cifar_slice, args, message):
    Path("a_file").write_text("not a folder")
    subcommand, *rest = args
    line = cli_error(capsys, subcommand, "--config", str(CONFIG), "--data.data_dir", str(cifar_slice), *rest)
    assert message in line


def test_no_subcommand_is_one_line(capsys):
    assert "expected \"subcommand\" to be one of {fit,validate,test,predict}" in cli_error(capsys)


@pytest.mark.parametrize(
    ("subcommand", "flag", "message"),
    [
        ("fit", "--trainer.limit_train_batches=0", "Trainer: limit_train_batches=0 leaves fit no training batch"),
        ("fit", "--trainer.limit_val_batches=0", "Trainer: limit_val_batches=0 leaves fit no validation batch"),
        ("fit", "--trainer.max_epochs=0", "Trainer: max_epochs=0 leaves fit nothing to train"),
        ("fit", "--trainer.max_steps=0", "Trainer: max_steps=0 leaves fit nothing to train"),
        ("fit", "--trainer.accumulate_grad_batches=0", "Trainer: accumulate_grad_batches=0 must be > 0"),
        ("fit", "--trainer.check_val_every_n_epoch=0", "Trainer: check_val_every_n_epoch=0 must be > 0"),
        ("fit", "--trainer.val_check_interval=0", "Trainer: val_check_interval=0 must be > 0"),
        ("validate", "--trainer.limit_val_batches=0", "Trainer: limit_val_batches=0 leaves validate no validation"),
        ("test", "--trainer.limit_test_batches=0", "Trainer: limit_test_batches=0 leaves test no test batch"),
    ],
)
def test_trainer_values_that_would_run_nothing_or_divide_by_zero_are_refused(capsys, tmp_path, subcommand, flag,
                                                                               message):
    checkpoint = [] if subcommand == "fit" else ["--ckpt_path", str(WEIGHTS)]
    line = cli_error(capsys, subcommand, "--config", str(CONFIG), "--data.data_dir", str(tmp_path), *checkpoint, flag)
    assert line.startswith(f"cifar-lightning: error: invalid configuration: {message}")


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_data_file_without_images_is_refused(capsys, tmp_path, subcommand):
    data = write_slice(tmp_path / "empty", n_train=0, n_test=0)
    checkpoint = [] if subcommand == "fit" else ["--ckpt_path", str(WEIGHTS)]
    line = cli_error(capsys, subcommand, "--config", str(CONFIG), "--data.data_dir", str(data), *checkpoint)
    assert f"{data / ('train.npz' if subcommand == 'fit' else 'test.npz')} holds no images" in line


IMAGES = np.zeros((4, 32, 32, 3), np.uint8)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": IMAGES, "labels": np.arange(4.0)}, r"labels must be integers 0-9, found float64 values "
                                                       r"\[0.0, 1.0, 2.0, 3.0\]"),
        ({"images": IMAGES, "labels": np.arange(4).astype(object)}, "stores an array as Python objects"),
        ({"images": IMAGES}, r"train.npz: missing array \['labels'\]"),
    ],
)
def test_malformed_data_is_named_for_what_it_is(tmp_path, arrays, message):
    np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(CIFAR10DataError, match=message) as error:
        load_cifar10(tmp_path, train=True)
    assert "truncated" not in str(error.value) and str(error.value).count("Fix:") == 1


def test_a_folder_with_train_npz_but_no_test_npz_says_so(tmp_path):
    np.savez(tmp_path / "train.npz", images=IMAGES, labels=np.arange(4))
    with pytest.raises(CIFAR10DataError, match=f"data folder {tmp_path} has train.npz but no test.npz"):
        load_cifar10(tmp_path, train=False)


def test_a_single_training_image_is_too_few_for_any_split(capsys, tmp_path):
    data = write_slice(tmp_path / "one", n_train=1, n_test=1)
    line = cli_error(capsys, "fit", "--config", str(CONFIG), "--data.data_dir", str(data))
    assert line == (f"cifar-lightning: error: CIFAR10DataModule: {data} holds 1 training image, and the "
                    f"train/validation split needs at least 2 (one to train on, one to validate on). Fix: point "
                    f"--data.data_dir at a folder with more training images, e.g. ../shared/cifar10.")


@pytest.mark.parametrize(
    ("n_train", "val_fraction", "message"),
    [
        (5, 0.1, "holds out no validation image. Fix: a larger --data.val_fraction, e.g. 0.2."),
        (3, 0.1, "holds out no validation image. Fix: a larger --data.val_fraction, e.g. 0.34."),
        (2, 0.2, "holds out no validation image. Fix: a larger --data.val_fraction, e.g. 0.5."),
        (10, 0.96, "holds out all of them, leaving none to train on. Fix: a smaller --data.val_fraction, e.g. 0.1."),
    ],
)
def test_a_split_without_validation_or_training_images_suggests_a_fraction_that_works(capsys, tmp_path, n_train,
                                                                                        val_fraction, message):
    data = write_slice(tmp_path / "few", n_train=n_train, n_test=1)
    line = cli_error(capsys, "fit", "--config", str(CONFIG), "--data.data_dir", str(data),
                     "--data.val_fraction", str(val_fraction))
    assert line == (f"cifar-lightning: error: CIFAR10DataModule: val_fraction={val_fraction} of the {n_train} "
                    f"training images in {data} {message}")
    suggested = CIFAR10DataModule(str(data), batch_size=1, val_fraction=float(message.rpartition(" ")[2][:-1]))
    suggested.setup("fit")
    assert len(suggested.train_set) >= 1 and len(suggested.val_set) >= 1


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
@pytest.mark.parametrize(("precision", "dtype"), [("16-true", "float16"), ("bf16-true", "bfloat16"),
                                                  ("transformer-engine", "bfloat16")])
def test_a_precision_that_holds_the_network_in_16_bits_is_refused(capsys, tmp_path, subcommand, precision, dtype):
    checkpoint = [] if subcommand == "fit" else ["--ckpt_path", str(WEIGHTS)]
    line = cli_error(capsys, subcommand, "--config", str(CONFIG), "--data.data_dir", str(tmp_path), *checkpoint,
                     "--trainer.precision", precision)
    assert line == (f"cifar-lightning: error: invalid configuration: Trainer: precision={precision} holds the "
                    f"network's weights in {dtype}, which this project cannot run: its images, attacks, defenses and "
                    f"int8 copies are float32. Fix: 32-true, or 16-mixed (AMP) on CUDA; bf16-mixed and 64-true work "
                    f"too.")


def test_a_network_tested_at_64_true_gets_its_int8_copies_from_float32():
    network = ClassifierModule().net.double().eval()
    images = torch.rand(8, 3, 32, 32)
    for copy in (quantize_dynamic_linear(network), quantize_static(network, images)):
        assert copy(images).shape == (8, 10)
    assert next(network.parameters()).dtype == torch.float64  # the tested network is left as it was


def test_more_calibration_images_than_training_images_are_refused_before_any_test_batch(capsys, cifar_slice,
                                                                                        tmp_path, monkeypatch):
    def edit(config):
        callback_args(config, "RobustnessEvaluation").update(strong_attacks=False, eps_sweep=[])
        callback_args(config, "QuantizationEvaluation")["calibration_images"] = 100000

    def no_test_batch(*args):
        raise AssertionError("a test batch ran")

    monkeypatch.setattr(ClassifierModule, "test_step", no_test_batch)
    line = cli_error(capsys, "test", "--config", str(write_config(tmp_path, edit)), "--data.data_dir",
                     str(cifar_slice), "--ckpt_path", str(WEIGHTS), "--trainer.enable_progress_bar", "false")
    assert line == (f"cifar-lightning: error: invalid configuration: QuantizationEvaluation: calibration_images=100000 "
                    f"is more than the 640 training images in {cifar_slice}. Fix: calibration_images of at most 640, "
                    f"e.g. 512.")


def test_a_run_shows_no_lightning_advert_or_deprecation_warning(cifar_slice, tmp_path):
    result = run_cli(*quick_fit_args(cifar_slice, "--trainer.limit_train_batches", "2",
                                     "--trainer.limit_val_batches", "2"), cwd=tmp_path)
    assert "litlogger" not in result.stderr and "LeafSpec" not in result.stderr
