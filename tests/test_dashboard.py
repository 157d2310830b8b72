"""The real TensorBoard server over a finished fit and test run serves what the README promises."""

import shutil
import urllib.parse

import pandas as pd
import pytest

from cifar_lightning.dashboard import HEADLINE, HPARAMS
from scripts.dashboard_screenshots import hparams_request, serve
from tests.conftest import TESTED_RUN

pytestmark = TESTED_RUN


@pytest.fixture(scope="module")
def dashboard(fitted_run, tested_run, tmp_path_factory):
    """``get(path)`` on a tensorboard server on 127.0.0.1 over the two runs, named ``fit`` and ``test``."""
    logdir = tmp_path_factory.mktemp("logdir")
    for name, run in (("fit", fitted_run), ("test", tested_run)):
        shutil.copytree(run, logdir / name, ignore=shutil.ignore_patterns("checkpoints"))
    with serve(logdir, {"fit", "test"}) as (_, get):
        yield get


def _query(**params: str) -> str:
    return urllib.parse.urlencode(params)


def _hparams(dashboard, route: str, **request) -> dict:
    return dashboard(hparams_request(route, **request))


def test_hparams_tab_opens_on_the_headline_accuracies_and_the_recipe(dashboard, tested_run):
    experiment = _hparams(dashboard, "experiment")
    metrics = [info["name"]["tag"] for info in experiment["metricInfos"]]
    assert metrics == list(HEADLINE) and metrics[0] == "test/acc"  # the UI shows the first five, in this order
    assert [info["name"] for info in experiment["hparamInfos"]] == list(HPARAMS)
    [group] = _hparams(dashboard, "session_groups", startIndex=0, sliceSize=100,
                       allowedStatuses=["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                       colParams=[])["sessionGroups"]  # the test run; a training run is no HPARAMS row
    hparams = group["hparams"]
    assert group["name"].startswith("best · ε 0.03 · 20")  # the weights, the budget, the time of the test
    assert hparams["adversarial_training"] == "none" and hparams["eps_test"] == 0.03
    assert hparams["recipe"] == "1 epoch, adamw plateau lr 0.001, weight decay 0.01, label smoothing 0.1, batch 64"
    assert hparams["defenses"] == "gaussian_k3, jpeg_q30, median_k3, tv_w0.1"
    values = {value["name"]["tag"]: value["value"] for value in group["metricValues"]}
    acc = pd.read_csv(tested_run / "results.csv").set_index(["model", "input"]).acc
    assert set(values) == set(HEADLINE) - {"test/autoattack_acc"}  # the run has no AutoAttack
    assert values["test/acc"] == pytest.approx(acc["fp32", "clean"])
    assert values["test/int8_acc"] == pytest.approx(acc["int8_dynamic", "clean"])


def test_scalars_tab_has_the_training_curves_and_only_the_headline_of_the_test(dashboard):
    tags = dashboard("/data/plugin/scalars/tags")
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "train/lr", "epoch"} <= set(tags["fit"])
    assert set(tags["test"]) == set(HEADLINE) - {"test/autoattack_acc"}
    [(_, step, fgsm)] = dashboard(f"/data/plugin/scalars/scalars?{_query(run='test', tag='test/fgsm_acc')}")
    assert 0 <= fgsm <= 1


def test_images_tab_serves_the_figures_as_png(dashboard):
    tags = dashboard("/data/plugin/images/tags")
    assert set(tags["test"]) == {"test/accuracy_bars", "test/sample", "test/samples_grid", "test/eps_curve",
                                 "test/corruption_bars"}
    [entry] = dashboard(f"/data/plugin/images/images?{_query(run='test', tag='test/accuracy_bars', sample='0')}")
    png = dashboard(f"/data/plugin/images/individualImage?{entry['query']}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_tab_has_one_entry_per_table_and_a_narrow_summary(dashboard):
    tables = ["summary", "tables/every_input", "tables/per_class", "tables/stage_times"]  # by name: summary first
    assert set(dashboard("/data/plugin/text/tags")["test"]) == {f"test/{name}/text_summary" for name in tables}
    [summary] = dashboard(f"/data/plugin/text/text?{_query(run='test', tag='test/summary/text_summary')}")
    columns = [row.count("<th") for row in summary["text"].split("<tr>") if "<th" in row]
    assert columns and max(columns) <= 4  # a column per model: readable at 1,280 px
    assert "strongest attack acc" in summary["text"] and "int8_dynamic" in summary["text"]
    [every_input] = dashboard(f"/data/plugin/text/text?{_query(run='test', tag='test/tables/every_input/text_summary')}")
    assert "non-adaptive" in every_input["text"] and "white-box (surrogate)" in every_input["text"]


def test_hparams_row_names_the_adversarial_recipe_and_refuses_unknown_columns():
    from cifar_lightning.dashboard import log_hparams, training_hparams

    hparams = {"adversarial": "n_fgsm", "adversarial_eps": 8 / 255, "optimizer": "sgd", "schedule": "onecycle",
               "lr": 0.1, "weight_decay": 5e-4, "label_smoothing": 0.0}
    assert training_hparams(hparams, epochs=15, batch_size=None) == {
        "adversarial_training": "n_fgsm, ε 8/255",
        "recipe": "15 epochs, sgd onecycle lr 0.1, weight decay 0.0005, label smoothing 0.0"}
    with pytest.raises(KeyError, match="'lr'"):
        log_hparams(None, {"lr": 0.1}, trial="x")


def test_two_studies_of_one_checkpoint_are_two_hparams_rows(tmp_path):
    """TensorBoard averages the runs of one trial ID: the same weights tested at two budgets must
    stay two rows, each with its own numbers."""
    from datetime import datetime

    from lightning.pytorch.loggers import TensorBoardLogger

    from cifar_lightning.dashboard import log_hparams, trial_name

    hparams = {"adversarial_training": "none", "defenses": "none", "recipe": "1 epoch"}
    for eps, fgsm in ((0.03, 0.05), (8 / 255, 0.04)):
        logger = TensorBoardLogger(tmp_path, name="", version=f"eps{eps:.4f}")  # both runs version 0 elsewhere
        logger.log_metrics({"test/fgsm_acc": fgsm}, step=0)
        log_hparams(logger, hparams | {"eps_test": eps}, trial_name("best", eps, datetime(2026, 11, 26, 4, 29)))
        logger.finalize("success")
    with serve(tmp_path, {"eps0.0300", "eps0.0314"}) as (_, get):
        groups = get(hparams_request("session_groups", startIndex=0, sliceSize=100, colParams=[],
                                     allowedStatuses=["STATUS_UNKNOWN", "STATUS_SUCCESS"]))["sessionGroups"]
    fgsm = {group["name"]: [v["value"] for v in group["metricValues"] if v["name"]["tag"] == "test/fgsm_acc"]
            for group in groups}
    assert fgsm == {"best · ε 0.03 · 2026-11-26 04:29:00": [pytest.approx(0.05)],
                    "best · ε 8/255 · 2026-11-26 04:29:00": [pytest.approx(0.04)]}
