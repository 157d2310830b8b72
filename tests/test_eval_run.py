"""`cifar-lightning test` with the default callbacks, end to end, single process and DDP."""

import json

import pandas as pd
import pytest
import torch

from cifar_lightning.data import load_cifar10
from cifar_lightning.module import ClassifierModule

from tests.conftest import TESTED_RUN, small_subset
from tests.helpers import SHARED_CIFAR10, callback_args, run_cli, scalars, write_config

DEFENSES = ["gaussian_k3", "jpeg_q30", "median_k3", "tv_w0.1"]
MODELS = ["fp32", "int8_dynamic", "int8_static"]

pytestmark = TESTED_RUN


def test_test_run_logs_the_headline_once_and_it_matches_the_tables(tested_run):
    from cifar_lightning.dashboard import HEADLINE

    logged = scalars(tested_run)
    # no per-class, per-ε or constant charts; no stray `epoch` point; no AutoAttack (not run)
    assert set(logged) == set(HEADLINE) - {"test/autoattack_acc"}
    assert all(len(values) == 1 for values in logged.values())
    table = pd.read_csv(tested_run / "results.csv")
    assert set(table.model) == set(MODELS)
    fgsm = table[table.threat == "non-adaptive"]  # FGSM at ε on every test image, its ε sweep on the subset
    assert (fgsm.images == fgsm.input.str.startswith("fgsm_eps").map({True: 32, False: 256})).all()
    acc = table.set_index(["model", "input"]).acc
    assert logged["test/acc"] == [pytest.approx(acc["fp32", "clean"])]  # the LightningModule == the callback
    assert logged["test/fgsm_acc"] == [pytest.approx(acc["fp32", "fgsm"])]
    undefended = table[(table.model == "fp32") & (table.defense == "none") & (table.attack != "none")
                       & ~table.input.str.contains("_eps")]
    linf, l2 = (undefended[undefended.norm == norm] for norm in ("Linf", "L2"))
    assert logged["test/strongest_attack_acc"] == [pytest.approx(linf.acc.min())]  # each threat model its own
    assert logged["test/strongest_attack_acc"][0] <= acc["fp32", "apgd-t"] <= acc["fp32", "pgd"] + 1e-9
    assert logged["test/l2_acc"] == [pytest.approx(l2.acc.min())] and (l2.eps == 0.5).all()
    defended = table[(table.model == "fp32") & (table.defense != "none") & (table.attack != "none")
                     & ~table.input.str.contains("_eps")]
    assert logged["test/best_defense_acc"] == [pytest.approx(defended.groupby("defense").acc.min().max())]
    assert logged["test/int8_acc"] == [pytest.approx(acc["int8_dynamic", "clean"])]
    assert logged["test/int8_static_acc"] == [pytest.approx(acc["int8_static", "clean"])]
    entry = json.loads((tested_run / "robustbench.json").read_text())  # RobustBench's format, beside the tables
    assert entry["clean_acc"] == f"{100 * acc['fp32', 'clean']:.2f}" and entry["autoattack_acc"] is None  # not run
    assert entry["clean_examples"] == 256 and (tested_run / "model_card.md").is_file()
    assert not (tested_run / "robustbench_corruptions.json").exists()  # severity 5 alone is not RobustBench's track


def test_the_flip_average_is_logged_beside_the_plain_accuracy_not_in_its_place(cifar_slice, fitted_run, tested_run):
    module = ClassifierModule.load_from_checkpoint(fitted_run / "checkpoints" / "best.ckpt").eval()
    images, labels = load_cifar10(cifar_slice, train=False)
    images = images.float() / 255
    with torch.no_grad():
        logits, mirrored = module(images), module(images.flip(-1))  # flip(-1): left to right
    logged = scalars(tested_run)
    plain = (logits.argmax(1) == labels).float().mean().item()
    flip_average = ((logits.softmax(1) + mirrored.softmax(1)).argmax(1) == labels).float().mean().item()
    assert logged["test/acc"] == [pytest.approx(plain)]
    assert logged["test/acc_flip_average"] == [pytest.approx(flip_average)]
    if (SHARED_CIFAR10 / "test.npz").is_file():  # on random images a 1-epoch model answers one class, flipped or not
        assert ((logits.softmax(1) + mirrored.softmax(1)).argmax(1) != logits.argmax(1)).any()  # two numbers, not one


def test_summary_agrees_with_the_results_table(tested_run):
    acc = pd.read_csv(tested_run / "results.csv").set_index(["model", "input"]).acc
    summary = pd.read_csv(tested_run / "summary.csv").set_index("model")
    assert list(summary.index) == MODELS
    assert summary.loc["fp32", "size_mb"] == pytest.approx(13.02, abs=0.05)
    assert summary.loc["int8_dynamic", "size_mb"] == pytest.approx(6.72, abs=0.05)
    for model in MODELS:
        assert summary.loc[model, "jpeg_q30_recovery"] == pytest.approx(acc[model, "fgsm/jpeg_q30"])
    markdown = (tested_run / "results.md").read_text()
    assert "non-adaptive" in markdown and "## Wall time per stage" in markdown


def test_per_class_accuracy_averages_to_the_overall_accuracy(tested_run, cifar_slice):
    import numpy as np

    acc = pd.read_csv(tested_run / "results.csv").set_index(["model", "input"]).acc
    per_class = pd.read_csv(tested_run / "per_class.csv", index_col="rows")
    with np.load(cifar_slice / "test.npz") as test:
        counts = np.bincount(test["labels"], minlength=10)
    assert list(per_class.index) == [f"{model} {kind}" for model in MODELS for kind in ("clean", "fgsm")]
    for row, values in per_class.iterrows():
        model, kind = row.split()
        present = counts > 0  # a class absent from the slice has no accuracy
        assert values.to_numpy()[present] @ counts[present] / counts.sum() == pytest.approx(acc[model, kind], abs=1e-6)


def test_figures_are_written_and_logged(tested_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = ("accuracy_bars", "sample", "eps_curve", "samples_grid", "corruption_bars")
    for name in names:
        assert (tested_run / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tested_run), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {f"test/{name}" for name in names} == set(events.Tags()["images"])


def test_strong_attacks_run_on_the_subset_and_their_masks_recompute_the_table(tested_run):
    table = pd.read_csv(tested_run / "results.csv").set_index(["model", "input"])
    masks = pd.read_csv(tested_run / "robust_masks.csv")
    assert len(masks) == 32 and masks["index"].is_unique and masks["label"].value_counts().max() <= 4  # stratified
    strong = [f"fp32/{name}" for name in ["pgd", "apgd-ce", "apgd-t", *[f"adaptive/{d}" for d in DEFENSES]]]
    strong += [f"{model}/{name}" for model in MODELS[1:] for name in ("transfer", "whitebox")]
    assert set(strong) <= set(masks.columns)
    for column in strong:
        model, name = column.split("/", 1)
        assert table.loc[(model, name), "images"] == 32
        assert table.loc[(model, name), "acc"] == pytest.approx(masks[column].mean()), column
    # The chain: an image robust under an attack survived every attack before it.
    for chain in (["pgd", "apgd-ce", "apgd-t"], ["l2.fgm", "l2.pgd", "l2.apgd-ce", "l2.apgd-t"]):  # L∞, L2
        for before, after in zip(chain, chain[1:]):
            assert (masks[f"fp32/{after}"] <= masks[f"fp32/{before}"]).all(), (before, after)
            assert table.loc[("fp32", after), "acc"] == pytest.approx(masks[f"fp32/{after}"].mean())
    assert table.loc[("fp32", "l2.apgd-t"), "worst_of"] == "fgm+pgd+apgd-ce+apgd-t"
    assert table.loc[("fp32", "pgd"), "worst_of"] == "fgsm+pgd"
    assert table.loc[("fp32", "adaptive/jpeg_q30"), "threat"] == "adaptive"
    assert table.loc[("int8_static", "whitebox"), "threat"] == "white-box (surrogate)"
    summary = pd.read_csv(tested_run / "summary.csv").set_index("model")
    assert summary.loc["int8_dynamic", "surrogate_agreement"] >= 0.99
    assert summary.loc["int8_static", "surrogate_agreement"] >= 0.99


def _switched(config: dict, on: bool) -> None:
    # On: one more member (FAB-T; Square runs in the checks of every run already), the L2 threat model
    # off, to keep the run short, and the ε sweep on every image: three switches, each changing only its
    # own rows.
    changes = {"ensemble": ["apgd-ce", "apgd-t", "fab-t"], "l2_eps": None, "sweep_on_subset": False} if on else {}
    small_subset(config, strong_attacks=on, adaptive=on, **changes)
    callback_args(config, "QuantizationEvaluation")["whitebox"] = on


@pytest.mark.parametrize("on", [False, True], ids=["all off", "all on"])
def test_optional_attacks_leave_every_other_number_identical(cifar_slice, fitted_run, tested_run, tmp_path, on):
    """Switching the strong attacks, the adaptive attacks, the int8 white-box attack or more ensemble
    members on or off, or the ε sweep from the subset to every image, changes only the rows they own:
    the attacks restore the model and the random stream exactly."""
    config = write_config(tmp_path, lambda c: _switched(c, on))
    run_cli("test", "--config", str(config), "--data.data_dir", str(cifar_slice), "--data.batch_size", "128",
            "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt"), "--trainer.enable_progress_bar", "false",
            cwd=tmp_path)
    switched = pd.read_csv(tmp_path / "lightning_logs" / "version_0" / "results.csv").set_index(["model", "input"])
    default = pd.read_csv(tested_run / "results.csv").set_index(["model", "input"])
    shared = default.index.intersection(switched.index)
    swept = shared[shared.get_level_values("input").str.startswith("fgsm_eps")]
    assert len(swept) == 1 + len(DEFENSES)  # FGSM at 2/255 and each defense of it, scored by fp32 alone
    assert (default.loc[swept, "images"] == 32).all()  # the default: on the subset
    assert (switched.loc[swept, "images"] == (256 if on else 32)).all()
    shared = shared.difference(swept) if on else shared
    pd.testing.assert_frame_equal(switched.loc[shared, ["acc", "attack_success"]], default.loc[shared, ["acc", "attack_success"]])
    if on:
        assert set(switched.index.difference(default.index)) == {("fp32", "fab-t")}
        assert {name for _, name in default.index.difference(switched.index)} == {
            "l2.fgm", "l2.pgd", "l2.apgd-ce", "l2.apgd-t"}
        assert (switched.loc[("fp32", "fab-t"), "acc"] <= switched.loc[("fp32", "apgd-t"), "acc"]).all()
    else:
        assert set(switched.index) <= set(default.index)
        assert ("fp32", "pgd") not in switched.index and not (tmp_path / "lightning_logs" / "version_0" / "robust_masks.csv").exists()
        caption = (tmp_path / "lightning_logs" / "version_0" / "results.md").read_text()
        assert "`non-adaptive` rows" in caption and "`adaptive` rows" not in caption  # the caption of the run at hand


def test_ddp_test_run_counts_each_image_once_and_matches_one_process(cifar_slice, fitted_run, tested_run, tmp_path):
    # The tested run's study without what this test does not compare (L2, the checks): a third of the time.
    config = write_config(tmp_path, lambda c: small_subset(c, l2_eps=None, checks=[]))
    run_cli("test", "--config", str(config), "--data.data_dir", str(cifar_slice), "--data.batch_size", "100",
            "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt"), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            cwd=tmp_path)
    ddp_run = tmp_path / "lightning_logs" / "version_0"
    assert not (tmp_path / "lightning_logs" / "version_1").exists()
    ddp, single = (pd.read_csv(run / "results.csv").set_index(["model", "input"]) for run in (ddp_run, tested_run))
    per_batch = ddp.threat.isin(["none", "non-adaptive"])
    every_image = per_batch & ~ddp.index.get_level_values("input").str.startswith("fgsm_eps")  # the sweep: subset
    assert (ddp.images[every_image] == 256).all()  # 2 ranks × uneven shards (100 + 28 each), no repeats
    assert (ddp.images[~every_image] == 32).all()  # the subset's: the sweep, the strong attacks, the corruptions'
    # FP32 only: int8_dynamic quantizes activations with each batch's range, and DDP batches differently.
    fp32 = ddp.index[per_batch & (ddp.index.get_level_values("model") == "fp32")]
    pd.testing.assert_series_equal(ddp.acc[fp32], single.acc[fp32], atol=1e-6)
    # Random starts are drawn per batch, and each rank batches its own share of the subset: close, not equal.
    assert ddp.acc["fp32", "apgd-t"] == pytest.approx(single.acc["fp32", "apgd-t"], abs=4 / 32)
    assert (ddp_run / "samples_grid.png").is_file()


@pytest.mark.parametrize("value, message", [
    ({"pgd_steps": 0}, "pgd_steps=0 must be an integer >= 1"),
    ({"pgd_restarts": 0}, "pgd_restarts=0 must be an integer >= 1"),
    ({"subset": 0}, "subset=0 must be an integer >= 1"),
    ({"ensemble": ["apgd-ce", "autoattack"]}, r"ensemble=\['apgd-ce', 'autoattack'\] has unknown attack 'autoattack'"),
    ({"eps": float("nan")}, "eps=nan must be in"),
])
def test_bad_strong_attack_values_are_refused_naming_the_field(value, message):
    from callbacks.robustness import RobustnessEvaluation

    with pytest.raises(ValueError, match=f"RobustnessEvaluation: {message}"):
        RobustnessEvaluation(**value)


@pytest.mark.parametrize("change, message", [
    ({"subset": 257}, "subset=257 is larger than the test set (256 images)"),
    ({"sample": 256}, "sample=256 is not an index of the test set (0 to 255)"),
])
def test_values_beyond_the_test_set_stop_with_one_line(cifar_slice, fitted_run, tmp_path, change, message):
    import subprocess

    from tests.helpers import CLI

    config = write_config(tmp_path, lambda c: small_subset(c, **change))  # the slice has 256 test images
    result = subprocess.run([*CLI, "test", "--config", str(config), "--data.data_dir", str(cifar_slice),
                             "--ckpt_path", str(fitted_run / "checkpoints" / "best.ckpt")],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"RobustnessEvaluation: {message}" in result.stderr


def test_compare_studies_puts_each_run_in_its_own_column(tested_run, tmp_path):
    import shutil

    from scripts.compare_studies import corruption_figure, every_input, per_class, tracks

    other = tmp_path / "other"
    shutil.copytree(tested_run, other, ignore=shutil.ignore_patterns("events.*", "*.png"))
    results = pd.read_csv(other / "results.csv")
    results.loc[(results.model == "fp32") & (results.input == "clean"), "acc"] = 0.5
    results.to_csv(other / "results.csv", index=False)
    table = every_input({"run": tested_run, "edited": other})
    original = pd.read_csv(tested_run / "results.csv")
    main_eps = original[~original.input.str.contains("_eps")]
    assert len(table) == len(main_eps) and list(table.columns) == ["run", "edited"]
    clean = table.index[0]
    assert clean.startswith("fp32 clean,") and table.loc[clean, "edited"] == "50.00%"
    assert table.loc[clean, "run"] == f"{main_eps.acc.iloc[0]:.2%}"
    assert (table.iloc[1:].run == table.iloc[1:].edited).all()
    classes = per_class({"run": tested_run})
    masks = pd.read_csv(tested_run / "robust_masks.csv")
    assert list(classes.columns) == ["run: clean", f"run: apgd-t chain ({len(masks):,})"]
    # The three tracks: each study's models, their strongest L∞ and L2 attack, the corruptions' mean and mCE.
    three = tracks({"run": tested_run, "edited": other})
    fp32 = original[original.model == "fp32"]
    l2 = fp32[fp32.norm == "L2"].acc.min()
    corrupted = fp32[(fp32.threat == "corruption") & (fp32.corruption != "none")].acc.mean()
    assert three.loc[("run", "fp32"), ["L2", "corruptions", "mCE"]].tolist() == [f"{l2:.2%} at ε = 0.5",
                                                                                 f"{corrupted:.2%}", "1.000"]
    assert three.loc[("edited", "fp32"), "clean"] == "50.00%" and three.loc[("run", "int8_static"), "L2"] == ""
    corruption_figure({"run": tested_run, "edited": other}, tmp_path / "corruptions.png")
    assert (tmp_path / "corruptions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
