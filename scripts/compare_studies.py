"""Test-time studies side by side, as markdown: one column per study, one row per number.

    .venv/bin/python scripts/compare_studies.py "standard, 0.03=lightning_logs/reference_fast10/test" \
        "robust, 0.03=lightning_logs/reference_adv/test_eps0.03"

Each study is `LABEL=RUN_FOLDER`, a folder that `cifar-lightning test` wrote (`results.csv`,
`per_class.csv`, `robust_masks.csv`). Two tables: every input kind at the study's main ε (the
ε sweep's rows left out), then accuracy per class on clean images (every test image) and under
the strongest attack chain of the subset (the last FP32 white-box column of `robust_masks.csv`).
With `--tracks`, first RobustBench's three tracks per study and model (clean; the lowest accuracy
any L∞ and any L2 white-box attack left; the mean over the common corruptions, per group, and the mCE and relative
mCE against the first study's FP32 model, Hendrycks & Dietterich's baseline);
with `--corruption_figure FILE.png`, the FP32 model's accuracy per corruption, a bar per study.
"""

import argparse
from pathlib import Path

import pandas as pd

from cifar_lightning.corruptions import GROUPS
from cifar_lightning.data import CLASSES
from cifar_lightning.evaluation import InputKind, mean_corruption_error
from cifar_lightning.report import corruption_bars


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
    """The rows of a results.csv at the study's main ε (and the clean, L2 and corruption ones), without the
    ε sweep's: results.csv lists the main ε's FGSM row first of the attacked rows. (Files written before the
    L2 threat model have no ``norm`` column: every budget there is L∞.)"""
    main_eps = rows.eps[rows.attack != "none"].iloc[0]
    linf = rows.norm == "Linf" if "norm" in rows else pd.Series(True, index=rows.index)
    return rows[~linf | rows.eps.isin([0.0, main_eps])]


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


def corruption_accuracy(rows: pd.DataFrame) -> dict[InputKind, float]:
    """A model's ``corruption`` rows as ``evaluation.mean_corruption_error`` takes them."""
    rows = rows[rows.threat == "corruption"]
    return {InputKind(threat="corruption", corruption=row.corruption, severity=int(row.severity)): row.acc
            for row in rows.itertuples()}


def tracks(studies: dict[str, Path]) -> pd.DataFrame:
    """A row per study and model: clean accuracy, the strongest L∞ and L2 attack's (the lowest
    accuracy of the white-box rows at the main budget), the mean corruption accuracy, its groups', and
    the (relative) mCE against the first study's FP32 model."""
    table, baseline = [], None
    for label, folder in studies.items():
        rows = pd.read_csv(folder / "results.csv")
        rows = rows.assign(**{column: rows.get(column, default) for column, default in
                              (("norm", "Linf"), ("corruption", "none"), ("severity", 0))})  # older files
        for model, own in rows.groupby("model", sort=False):
            row = {"study": label, "model": model, "clean": f"{own.acc[own.input == 'clean'].iloc[0]:.2%}"}
            for norm in ("Linf", "L2"):
                attacked = own[(own.norm == norm) & own.threat.isin(["white-box", "transfer", "white-box (surrogate)"])]
                main = attacked[attacked.eps == attacked.eps.iloc[0]] if not attacked.empty else attacked
                row[norm] = f"{main.acc.min():.2%} at ε = {main.eps.iloc[0]:.4g}" if not main.empty else ""
            corrupted = own[(own.threat == "corruption") & (own.corruption != "none")]
            means = {"corruptions": corrupted.acc.mean()} | {
                group: corrupted.acc[corrupted.corruption.isin(names)].mean() for group, names in GROUPS.items()}
            row |= {name: "" if value != value else f"{value:.2%}" for name, value in means.items()}
            by_kind = corruption_accuracy(own)
            baseline = baseline or by_kind
            if by_kind:
                row |= {"mCE": f"{mean_corruption_error(by_kind, baseline):.3f}",
                        "relative mCE": f"{mean_corruption_error(by_kind, baseline, relative=True):.3f}"}
            table.append(row)
    return pd.DataFrame(table).set_index(["study", "model"]).fillna("")


def corruption_figure(studies: dict[str, Path], path: Path) -> None:
    rows = pd.concat(pd.read_csv(folder / "results.csv").query("model == 'fp32'").assign(model=label)
                     for label, folder in studies.items())
    images = rows.images[rows.threat == "corruption"].iloc[0]
    corruption_bars(rows, f"FP32 accuracy per common corruption,\nmean over severities 1-5 ({images:,} images)"
                    ).savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", type=study, nargs="+", metavar="LABEL=RUN_FOLDER")
    parser.add_argument("--tracks", action="store_true", help="first RobustBench's three tracks per study and model")
    parser.add_argument("--corruption_figure", type=Path, metavar="FILE.png",
                        help="draw the FP32 accuracy per corruption, a bar per study, into this file")
    arguments = parser.parse_args()
    studies = dict(arguments.studies)
    if arguments.corruption_figure:
        corruption_figure(studies, arguments.corruption_figure)
    if arguments.tracks:
        print(tracks(studies).to_markdown(disable_numparse=True))
        print()
    print(every_input(studies).to_markdown(disable_numparse=True, colalign=["left"] + ["right"] * len(studies)))
    print()
    print(per_class(studies).to_markdown(disable_numparse=True))


if __name__ == "__main__":
    main()
