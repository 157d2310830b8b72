"""The common corruptions in the study: every model under test on the same corrupted images, rows and mCE."""

import pytest
import torch
from torch import nn

from callbacks.corruptions import CorruptionEvaluation
from cifar_lightning.corruptions import corrupt
from cifar_lightning.evaluation import CorruptionSuite, InputKind, ModelUnderTest, mean_corruption_error
from cifar_lightning.study import Study


def _models():
    torch.manual_seed(0)
    first = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    second = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    return first, second


def _study(suite, batch_size=16):
    first, second = _models()
    study = Study(ModelUnderTest("fp32", first, torch.device("cpu")), latency_batch_size=4)
    study.add_model(ModelUnderTest("other", second, torch.device("cpu"), gradients=False))
    study.set_corruptions(suite)
    return study, first, second


def test_each_model_is_scored_on_the_same_corrupted_images_of_the_subset():
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, 3, 32, 32, generator=generator), torch.randint(0, 10, (40,), generator=generator)
    suite = CorruptionSuite(["gaussian_noise", "contrast"], [1, 5], images=20, seed=3)
    study, first, second = _study(suite)
    study.begin(labels, 16, torch.device("cpu"))  # after the latency runs: count the images each model scores
    seen = {model: 0 for model in (first, second)}
    for model in seen:
        model.register_forward_hook(lambda module, inputs, output: seen.__setitem__(module, seen[module] + len(output)))
    for start in range(0, 40, 16):  # batches that cut across the subset
        study.update(images[start:start + 16], labels[start:start + 16], list(range(start, min(start + 16, 40))))
    study.finish()
    # Each clean test image once (the clean row of the subset comes from the test batches), each of the
    # 4 corrupted versions of the 20 subset images once.
    assert seen == {first: 40 + 4 * 20, second: 40 + 4 * 20}
    rows = study.report.details().set_index(["model", "input"])
    chosen = sorted(study.corrupted_indices)
    assert len(chosen) == 20
    for model, name in ((first, "fp32"), (second, "other")):
        for kind in suite.kinds:
            corrupted = images[chosen] if kind.corruption == "none" else suite(kind, images[chosen], torch.tensor(chosen))
            expected = (model(corrupted).argmax(1) == labels[chosen]).float().mean().item()
            row = rows.loc[(name, kind.name)]
            assert row.acc == pytest.approx(expected) and row.images == 20, (name, kind.name)
    assert rows.loc[("fp32", "corruption.contrast_s5"), ["threat", "corruption", "severity"]].tolist() == [
        "corruption", "contrast", 5]
    summary = study.report.summary_frame().set_index("model")
    corrupted_rows = rows.loc["fp32"][rows.loc["fp32"].corruption.isin(["gaussian_noise", "contrast"])]
    assert summary.loc["fp32", "corruption_acc"] == pytest.approx(corrupted_rows.acc.mean())
    assert {"mce_vs_fp32", "relative_mce_vs_fp32"} <= set(summary.columns)
    assert study.report.headline()["test/corruption_acc"][0] == pytest.approx(corrupted_rows.acc.mean())


def test_corrupted_pixels_do_not_depend_on_the_batch():
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    indices = torch.arange(100, 108)
    whole = corrupt(images, "shot_noise", 3, seed=0, indices=indices)
    assert torch.equal(whole[5:], corrupt(images[5:], "shot_noise", 3, seed=0, indices=indices[5:]))


def test_mean_corruption_error_against_a_baseline():
    def accuracies(clean, by_corruption):
        kinds = {InputKind(threat="corruption", corruption="none"): clean}
        for name, values in by_corruption.items():
            kinds |= {InputKind(threat="corruption", corruption=name, severity=s + 1): a for s, a in enumerate(values)}
        return kinds

    baseline = accuracies(0.9, {"fog": [0.8, 0.6], "contrast": [0.7, 0.5]})  # errors: fog 0.6, contrast 0.8
    model = accuracies(0.8, {"fog": [0.5, 0.5], "contrast": [0.7, 0.5]})  # errors: fog 1.0, contrast 0.8
    assert mean_corruption_error(baseline, baseline) == pytest.approx(1.0)
    assert mean_corruption_error(model, baseline) == pytest.approx((1.0 / 0.6 + 0.8 / 0.8) / 2)
    # relative: minus each model's clean error (0.2 and 0.1, twice per corruption)
    assert mean_corruption_error(model, baseline, relative=True) == pytest.approx((0.6 / 0.4 + 0.4 / 0.6) / 2)


@pytest.mark.parametrize("arguments, message", [
    ({"corruptions": ["fogg"]}, "CorruptionEvaluation: corruption 'fogg' is not one of gaussian_noise"),
    ({"severities": [0]}, "CorruptionEvaluation: severity 0 is outside 1–5"),
    ({"severities": [6]}, "CorruptionEvaluation: severity 6 is outside 1–5"),
    ({"images": 0}, "CorruptionEvaluation: images=0 must be an integer >= 1"),
    ({"corruptions": []}, r"CorruptionEvaluation: corruptions=\[\] leaves nothing to run"),
])
def test_bad_corruption_values_are_refused_naming_the_field(arguments, message):
    with pytest.raises(ValueError, match=message):
        CorruptionEvaluation(**arguments)
