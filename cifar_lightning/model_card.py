"""A test run in the format the field reads: RobustBench's model-info JSON and a short model card.

RobustBench (Croce et al. 2021) lists each model with a JSON of these fields (its
``model_info/cifar10/Linf/*.json``): ``name``, ``link``, ``authors``, ``venue``, ``dataset``,
``architecture``, ``additional_data``, ``number_forward_passes``, ``eps`` (``"8/255"``), ``clean_acc``
and ``autoattack_acc`` (percent, two decimals, as text) and ``footnote``. The entry
written here has those, and says what RobustBench's leaves implicit: the threat model, how many images
each accuracy is over, the training recipe, the date, and the versions that computed it.

``autoattack_acc`` is AutoAttack's standard version only (``RobustnessEvaluation(autoattack="standard")``,
rows ``autoattack.*``); without it the field is null and the footnote says so: the project's faster
chain is not the number RobustBench ranks by.

RobustBench's common-corruptions track (``model_info/cifar10/corruptions/*.json``) has the same fields
with ``corruptions_acc``, the mean over CIFAR-10-C's 15 corruptions × 5 severities, in place of
``autoattack_acc`` and no ``eps``: :func:`corruptions_entry`, when every one of the 75 ran.
"""

import json
import math
from dataclasses import dataclass
from datetime import date
from importlib.metadata import version

import pandas as pd

from cifar_lightning.corruptions import CORRUPTIONS, SEVERITIES
from cifar_lightning.dashboard import HEADLINE, eps_label
from cifar_lightning.report import autoattack_result, corrupted_rows

PRIMARY = "fp32"


@dataclass(frozen=True)
class About:
    """What the study cannot see in its numbers: which weights these are and how they were trained.

    Args:
        name: the weights' name (the checkpoint's file name without suffix).
        architecture: the network's class name.
        adversarial_training: e.g. ``none``, ``pgd, ε 8/255`` (``dashboard.training_hparams``).
        recipe: the rest of the training recipe, or ``not known`` for weights from outside.
    """

    name: str
    architecture: str
    adversarial_training: str = "not known"
    recipe: str = "not known"


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}"


def robustbench_entry(rows: pd.DataFrame, about: About, tested_on: date | None = None) -> dict:
    """The RobustBench entry of the first model under test from the study's ``rows`` (``Report.rows_with_kinds``)."""
    fp32 = rows[(rows.model == PRIMARY) & ~rows.kind.map(lambda kind: kind.sweep)].set_index("input", drop=False)
    clean, final = fp32.loc["clean"], autoattack_result(rows)
    linf = fp32[fp32.kind.map(lambda kind: kind.attacked and kind.norm == "Linf")]  # the entry's threat model
    eps = final.eps if final is not None else linf.eps.max()
    if final is not None:
        footnote = (f"AutoAttack ({final.kind.autoattack}: {final.worst_of.replace('+', ', ')}) on {final.images:,} "
                    f"class-stratified test images; clean accuracy on {clean.images:,}.")
    else:
        footnote = ("AutoAttack's standard version was not run (RobustnessEvaluation autoattack: standard runs it), so "
                    "there is no autoattack_acc.")
    return _entry(about, "Linf", None if math.isnan(eps) else eps_label(eps), clean, tested_on, {
        "autoattack_acc": _percent(final.acc if final is not None else None),
        "footnote": footnote,
        "clean_examples": int(clean.images),
        "autoattack_examples": int(final.images) if final is not None else None,
        "autoattack_version": final.kind.autoattack if final is not None else None,
    })


def corruptions_entry(rows: pd.DataFrame, about: About, tested_on: date | None = None) -> dict | None:
    """The RobustBench common-corruptions entry of the first model under test from the study's ``rows``;
    None unless it was scored on every corruption at every severity (RobustBench's number is their mean)."""
    corrupted = corrupted_rows(rows)
    if len(set(zip(corrupted.corruption, corrupted.severity))) < len(CORRUPTIONS) * len(SEVERITIES):
        return None
    images = int(corrupted.images.iloc[0])
    clean = rows[(rows.model == PRIMARY) & (rows.input == "clean")].iloc[0]
    return _entry(about, "corruptions", None, clean, tested_on, {
        "corruptions_acc": _percent(corrupted.acc.mean()),
        "footnote": (f"The mean over CIFAR-10-C's {len(CORRUPTIONS)} corruptions × {len(SEVERITIES)} severities, "
                     f"generated with the published parameters on {images:,} class-stratified test images (not read "
                     f"from the published CIFAR-10-C files); clean accuracy on {int(clean.images):,}."),
        "clean_examples": int(clean.images),
        "corruptions_examples": images,
    })


def _entry(about: About, threat_model: str, eps: str | None, clean: pd.Series, tested_on: date | None,
           track: dict) -> dict:
    """RobustBench's fields in its order, ``track``'s (the track's accuracy, footnote, image counts) after
    ``clean_acc``, then what RobustBench leaves implicit."""
    return {
        "name": about.name,
        "link": "",
        "authors": "",
        "venue": "N/A",
        "dataset": "cifar10",
        "threat_model": threat_model,
        "architecture": about.architecture,
        "additional_data": False,
        "number_forward_passes": 1,
        "eps": eps,
        "clean_acc": _percent(clean.acc),
        **track,
        "adversarial_training": about.adversarial_training,
        "training_recipe": about.recipe,
        "date": (tested_on or date.today()).isoformat(),
        "version": {package: version(package) for package in ("cifar-lightning", "torch", "torchattacks")},
    }


def entry_json(entry: dict) -> bytes:
    return (json.dumps(entry, indent=2, ensure_ascii=False) + "\n").encode()


def model_card(entry: dict, headline: dict[str, tuple[float, str]], corruptions: dict | None = None) -> str:
    """A short markdown card: the RobustBench numbers first (``corruptions``: the corruptions track's entry,
    when it ran), then the study's headline, then provenance."""
    autoattack = entry["autoattack_acc"]
    lines = [
        f"# {entry['name']}: CIFAR-10, {entry['threat_model']} ε = {entry['eps']}",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | {entry['architecture']} |",
        f"| adversarial training | {entry['adversarial_training']} |",
        f"| training recipe | {entry['training_recipe']} |",
        f"| clean accuracy | {entry['clean_acc']}% ({entry['clean_examples']:,} test images) |",
        f"| AutoAttack ({entry['autoattack_version']}) | {autoattack}% ({entry['autoattack_examples']:,} test images) |"
        if autoattack is not None else "| AutoAttack | not run |",
        *([f"| common corruptions | {corruptions['corruptions_acc']}% ({corruptions['corruptions_examples']:,} "
           f"test images) |"] if corruptions else []),
        "",
        entry["footnote"],
        *(["", corruptions["footnote"]] if corruptions else []),
        "",
        "## The study's headline",
        "",
        "| | accuracy | of what |",
        "| --- | --- | --- |",
        *[f"| {HEADLINE[tag]} | {100 * value:.2f}% | {what} |" for tag, (value, what) in headline.items()],
        "",
        f"Tested on {entry['date']} with "
        + ", ".join(f"{package} {number}" for package, number in entry["version"].items()) + ".",
        "",
    ]
    return "\n".join(lines)
