"""`cifar_lightning.evaluate`: the study from Python gives what `cifar-lightning test` gives."""

import pandas as pd
import pytest
import torch

from cifar_lightning import evaluate
from cifar_lightning.module import ClassifierModule
from tests.conftest import CHEAP_CHECKS, CHEAP_CORRUPTIONS, small_subset
from tests.helpers import callback_args, run_cli, write_config

# A quick study: one ε, two defenses' worth of work, a 32-image subset, PGD-3 then APGD-CE.
QUICK = {"eps_sweep": [2 / 255], "subset": 32, "pgd_steps": 3, "ensemble": ["apgd-ce"]} | CHEAP_CHECKS


def _quick(config: dict) -> None:
    small_subset(config, **QUICK)
    callback_args(config, "QuantizationEvaluation")["static"] = False


@pytest.fixture(scope="module")
def cli_run(cifar_slice, fitted_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli")
    config = write_config(workdir, _quick)
    run_cli("test", "--config", str(config), "--data.data_dir", str(cifar_slice), "--data.batch_size", "128",
            "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt"), "--trainer.enable_progress_bar", "false",
            cwd=workdir)
    return workdir / "lightning_logs" / "version_0"


def test_evaluate_and_the_cli_give_the_same_results_row_for_row(cifar_slice, fitted_run, cli_run, tmp_path):
    network = ClassifierModule.load_from_checkpoint(fitted_run / "checkpoints" / "best.ckpt").net.model
    before = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    results = evaluate(network, cifar_slice, quantization={"static": False}, corruptions=CHEAP_CORRUPTIONS,
                       runs_dir=tmp_path / "runs", progress=False, **QUICK)
    assert results.run_dir == tmp_path / "runs" / "version_0"
    api, cli = (pd.read_csv(run / "results.csv") for run in (results.run_dir, cli_run))
    pd.testing.assert_frame_equal(api, cli)
    pd.testing.assert_frame_equal(pd.read_csv(results.run_dir / "robust_masks.csv"), pd.read_csv(cli_run / "robust_masks.csv"))
    # The returned tables are the files.
    assert results.results.acc.tolist() == api.acc.tolist() and list(results.summary.model) == ["fp32", "int8_dynamic"]
    assert results.robust_masks.shape == (32, 2 + 7 + 3 + 2)  # index, label; fp32: 7 L∞, 3 L2; int8: 2 and list(results.per_class.columns)[:2] == ["airplane", "automobile"]
    assert {"results.md", "sample.png", "accuracy_bars.png"} <= {p.name for p in results.run_dir.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in results.run_dir.iterdir())
    # The model handed in is not changed: weights, mode.
    assert network.training and all(torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_evaluate_takes_a_model_of_pixels_and_refuses_bad_options(cifar_slice, tmp_path):
    torch.manual_seed(0)
    pixels = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    results = evaluate(pixels, cifar_slice, normalization=None, quantization=False, corruptions=False, images=64,
                       eps_sweep=[], strong_attacks=False, defenses=[], runs_dir=tmp_path, progress=False)
    with torch.no_grad():
        from cifar_lightning.data import load_cifar10

        images, labels = load_cifar10(cifar_slice, train=False)
        expected = (pixels(images[:64].float() / 255).argmax(1) == labels[:64]).float().mean().item()
    assert results.results.set_index("input").acc["clean"] == pytest.approx(expected)
    assert list(results.results.input) == ["clean", "fgsm"]
    with pytest.raises(ValueError, match="RobustnessEvaluation: eps=2 must be in"):
        evaluate(pixels, cifar_slice, eps=2)
    with pytest.raises(ValueError, match=r"evaluate: the model returns \(1, 5\) for a \(1, 3, 32, 32\) image"):
        evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)), cifar_slice)
    with pytest.raises(ValueError, match=r"evaluate: normalization.std=\[0.5\] must hold 3 numbers"):
        evaluate(pixels, cifar_slice, normalization={"mean": [0.5] * 3, "std": [0.5]})
