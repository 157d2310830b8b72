"""Test-time studies side by side, as markdown: one column per study, one row per number.

    .venv/bin/python scripts/compare_studies.py "standard, 0.03=lightning_logs/reference_fast10/test" \
        "robust, 0.03=lightning_logs/reference_adv/test_eps0.03"

Each study is `LABEL=RUN_FOLDER`, a folder that `cifar-lightning test` wrote (`results.csv`,
`per_class.csv`, `robust_masks.csv`). Two tables: every input kind at the study's main ε (the
ε sweep's rows left out), then accuracy per class on clean images (every test image) and under
the strongest attack chain of the subset (the last FP32 white-box column of `robust_masks.csv`).
"""

import argparse
from pathlib import Path

import pandas as pd

from cifar_lightning.data import CLASSES


def study(argument: str) -> tuple[str, Path]:
    label, separator, folder = argument.rpartition("=")
    if not separator or not label:
        raise argparse.ArgumentTypeError(f"{argument!r} is not LABEL=RUN_FOLDER. Fix: e.g. "
                                         f"\"robust, 8/255=lightning_logs/version_3\"")
    if not (Path(folder) / "results.csv").is_file():
        raise argparse.ArgumentTypeError(f"{folder} has no results.csv. Fix: pass the folder of a test run")
    return label, Path(folder)


def row_name(row: pd.Series) -> str:
    """What a results.csv row measures, in words: model, input kind, threat and its image count."""
    chain = f", worst of {row.worst_of}" if isinstance(row.worst_of, str) else ""
    threat = "" if row.threat == "none" else f" ({row.threat}{chain})"
    return f"{row.model} {row.input}{threat}, {row.images:,} images"


def at_main_eps(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of a results.csv at the study's main ε (and the clean ones), without the ε sweep's:
    results.csv lists the main ε's FGSM row first of the attacked rows."""
    main_eps = rows.eps[rows.attack != "none"].iloc[0]
    return rows[rows.eps.isin([0.0, main_eps])]


def strongest_chain(rows: pd.DataFrame) -> str:
    """The input kind of the FP32 model's longest white-box chain at the main ε (its last member)."""
    rows = at_main_eps(rows)
    white_box = rows[(rows.model == "fp32") & (rows.threat == "white-box")]
    return white_box.loc[white_box.worst_of.str.count(r"\+").idxmax(), "input"]


def every_input(studies: dict[str, Path]) -> pd.DataFrame:
    columns = {}
    for label, folder in studies.items():
        rows = at_main_eps(pd.read_csv(folder / "results.csv"))
        columns[label] = pd.Series(rows.acc.to_numpy(), index=rows.apply(row_name, axis=1))
    return pd.DataFrame(columns).map(lambda acc: "" if acc != acc else f"{acc:.2%}")


def per_class(studies: dict[str, Path]) -> pd.DataFrame:
    columns = {}
    for label, folder in studies.items():
        columns[f"{label}: clean"] = pd.read_csv(folder / "per_class.csv", index_col="rows").loc["fp32 clean"]
        masks_file = folder / "robust_masks.csv"
        if masks_file.is_file():
            masks = pd.read_csv(masks_file)
            strongest = strongest_chain(pd.read_csv(folder / "results.csv"))
            robust = masks.groupby("label")[f"fp32/{strongest}"].mean()
            columns[f"{label}: {strongest} chain ({len(masks):,})"] = \
                pd.Series(robust.to_numpy(), index=[CLASSES[i] for i in robust.index])
    return pd.DataFrame(columns).map(lambda acc: f"{acc:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", type=study, nargs="+", metavar="LABEL=RUN_FOLDER")
    studies = dict(parser.parse_args().studies)
    print(every_input(studies).to_markdown(disable_numparse=True, colalign=["left"] + ["right"] * len(studies)))
    print()
    print(per_class(studies).to_markdown(disable_numparse=True))


if __name__ == "__main__":
    main()
