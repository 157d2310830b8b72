"""The test run's report: tables (pandas), figures (matplotlib), atomic files, TensorBoard."""

import io
from operator import attrgetter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only; never a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import PercentFormatter
from torch import Tensor

from cifar_lightning.checks import Flag
from cifar_lightning.dashboard import HEADLINE, eps_label
from cifar_lightning.data import CLASSES
from cifar_lightning.evaluation import CLEAN, InputKind
from cifar_lightning.files import write_atomic

# What each kind of row means, said only when the run has such rows: threat → sentence.
THREAT_NOTES = {
    "non-adaptive": "`non-adaptive` rows are FGSM crafted on the undefended FP32 model, then the defense: an attacker "
                    "who does not know the defense.",
    "white-box": "`white-box` rows are the strong attacks on the subset of `images`; an image counts as robust only "
                 "if it survived every attack in `worst_of`.",
    "adaptive": "`adaptive` rows attack through the defense (its exact gradient where it has one, the identity where "
                "not: BPDA).",
    "transfer": "int8 `transfer` rows score the FP32 model's worst-case images on the int8 model.",
    "corruption": "`corruption.*` rows are the common corruptions of CIFAR-10-C (Hendrycks & Dietterich 2019) at each "
                  "severity, on their own subset of `images`; `corruption.clean` is that subset uncorrupted.",
    "white-box (surrogate)": "int8 `white-box (surrogate)` rows attack a fake-quantized copy with the int8 model's own "
                             "scales and score the real int8 model.",
}
AUTOATTACK_NOTE = ("`autoattack.*` rows are AutoAttack's members (Croce & Hein 2020) at its standard version's budgets, "
                   "in order from the clean images, each on the images every earlier one left; with all four "
                   "(`autoattack: standard`, as RobustBench reports it) the last row is the AutoAttack accuracy.")


def _cell(value: object) -> str:
    """A table cell as text (tables given as text keep it: ``to_markdown(disable_numparse=True)``)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.4f}"
    return str(value)


def figure_png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


# The summary's column of a defended row, by its threat: ``<defense>_clean``, ``_recovery``, ``_adaptive``.
_DEFENSE_COLUMNS = {"none": "clean", "non-adaptive": "recovery", "adaptive": "adaptive"}


def corrupted_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The FP32 model's rows of the common corruptions (every corruption and severity, not the clean subset)."""
    return rows[(rows.model == "fp32") & (rows.threat == "corruption") & (rows.corruption != "none")]


def autoattack_result(rows: pd.DataFrame) -> pd.Series | None:
    """The FP32 model's AutoAttack row at the main ε (the standard version's last member: the worst case), or
    None if the standard version did not run (a part of it is no AutoAttack accuracy)."""
    autoattack = rows[(rows.model == "fp32") & rows.kind.map(lambda kind: kind.autoattack == "standard" and not kind.sweep)]
    return autoattack.iloc[-1] if not autoattack.empty else None


def _last_lowest(rows: pd.DataFrame) -> pd.Series:
    """The row of the lowest accuracy; of tied rows the last, the longest chain of attacks."""
    return rows[rows.acc == rows.acc.min()].iloc[-1]


class Report:
    """Rows of results per (model, input kind) and one summary row per model."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.summary: dict[str, dict] = {}
        self.per_class: dict[str, dict[str, float]] = {}
        self.stage_seconds: dict[str, float] = {}
        self.robust_masks: pd.DataFrame | None = None  # per image of the strong attacks' subset
        self.notes: list[str] = []  # what was not run, and why
        self.flags: list[Flag] = []  # attack-failure checks that fired (checks.py)

    def add(self, model: str, results: dict, kinds: list[InputKind]) -> None:
        """``results`` from ``RobustnessMetrics.compute`` (every test image; the ε sweep's kinds on the
        subset with ``sweep_on_subset``) or ``RobustAccuracy.compute`` (the strong attacks' subset), for the
        input ``kinds``; ``results["images"]``: each input's number of images."""
        accuracy, success = results["acc"], results["attack_success"]
        for kind in kinds:
            self.rows.append({"model": model, **kind.row(), "images": results["images"][kind.name],
                              "acc": accuracy[kind.name],
                              "attack_success": success.get(kind.name, float("nan")),
                              "worst_of": "+".join(kind.worst_of) or None, "kind": kind})
        for name, per_class in results.get("acc_class", {}).items():
            self.per_class[f"{model} {name}"] = per_class
        row = self.summary.setdefault(model, {})
        if CLEAN.name in accuracy:
            row |= {"test_images": results["images"][CLEAN.name], "clean_acc": accuracy[CLEAN.name]}
            if "fgsm" in accuracy:
                row |= {"fgsm_acc": accuracy["fgsm"], "fgsm_success": success["fgsm"]}
        if results.get("agreement") is not None:
            row["agreement_with_fp32"] = results["agreement"]
        for kind in kinds:
            if kind.sweep:
                continue
            if kind.defense:  # the defense's cost on clean images, its recovery against FGSM, its adaptive attack
                row[f"{kind.defense}_{_DEFENSE_COLUMNS[kind.threat]}"] = accuracy[kind.name]
            elif kind.threat not in ("none", "non-adaptive", "corruption"):
                row[f"{kind.name}_acc"] = accuracy[kind.name]  # the strong attacks at the main ε

    def add_flags(self, flags: list[Flag]) -> None:
        """Checks that fired: they mark their rows (``flag`` column) and the model's summary row."""
        self.flags += flags
        for flag in flags:
            row = self.summary.setdefault(flag.model, {})
            row["flagged_by"] = ", ".join(filter(None, [row.get("flagged_by"), flag.check]))

    def flag_of(self, model: str, input_name: str) -> str:
        """The reasons of every flag on a row, or ``""``."""
        return "; ".join(f.reason for f in self.flags if f.model == model and input_name in f.inputs)

    def add_model_info(self, model: str, **info) -> None:
        """Size, latency, device… for the summary row of ``model``."""
        self.summary.setdefault(model, {}).update(info)

    def headline(self) -> dict[str, tuple[float, str]]:
        """The run in a few numbers, ``dashboard.HEADLINE`` tag → (accuracy, what it is), from the rows
        at the main ε: FP32 clean and under FGSM; under its strongest attack (the lowest accuracy any attack
        leaves) for each threat model, L∞ and L2; its mean accuracy under the common corruptions;
        AutoAttack's, when it ran; the best defense against the strongest attacker it met; each int8
        model, clean."""
        rows = self.rows_with_kinds()
        if rows.empty:
            return {}
        fp32 = rows[(rows.model == "fp32") & ~rows.kind.map(attrgetter("sweep"))]
        attacked = fp32[fp32.attack != "none"]
        by_input = fp32.set_index("input")
        clean = by_input.loc["clean"]
        headline = {"test/acc": (clean.acc, f"FP32, {clean.images:,} images")}
        if "fgsm" in by_input.index:
            fgsm = by_input.loc["fgsm"]
            headline["test/fgsm_acc"] = (fgsm.acc, f"FGSM at ε = {fgsm.eps:.4f}, {fgsm.images:,} images")
        undefended = attacked[attacked.defense == "none"]
        for norm, tag in (("Linf", "test/strongest_attack_acc"), ("L2", "test/l2_acc")):
            if (undefended.norm == norm).any():
                worst = _last_lowest(undefended[undefended.norm == norm])
                chain = worst.get("worst_of")
                attack = f"per image the worst of {chain}" if isinstance(chain, str) else worst.input
                headline[tag] = (worst.acc, f"{norm} ε = {worst.eps:.4g}: {attack} ({worst.images:,} images)")
        corrupted = corrupted_rows(rows)
        if not corrupted.empty:
            headline["test/corruption_acc"] = (corrupted.acc.mean(), f"mean of {len(corrupted)} corruptions × severities, "
                                                                     f"{corrupted.images.iloc[0]:,} images")
        final = autoattack_result(rows)
        if final is not None:
            what = f"AutoAttack ({final.kind.autoattack}: {final.worst_of}), {final.images:,} images"
            headline["test/autoattack_acc"] = (final.acc, what)
        defended = attacked[attacked.defense != "none"]
        if not defended.empty:
            worst_per_defense = pd.DataFrame([_last_lowest(rows) for _, rows in defended.groupby("defense")])
            # A flagged row's number may be the attack's failure: it is best only if every defense is flagged.
            flagged = worst_per_defense.input.map(lambda name: self.flag_of("fp32", name))
            candidates = worst_per_defense[flagged == ""] if (flagged == "").any() else worst_per_defense
            best = candidates.loc[candidates.acc.idxmax()]
            note = f"; flagged: {flagged[best.name]}" if flagged[best.name] else ""
            higher = worst_per_defense[(flagged != "") & (worst_per_defense.acc > best.acc)]
            higher = higher.sort_values("acc", ascending=False)
            if not higher.empty:  # passed over, not hidden: the reader sees what the flags set aside
                note += "; higher but flagged: " + ", ".join(f"{row.defense} {row.acc:.2%}" for row in higher.itertuples())
            headline["test/best_defense_acc"] = (best.acc, f"{best.defense} against its strongest attacker, "
                                                           f"{best.input} ({best.images:,} images){note}")
        for model, tag in (("int8_dynamic", "test/int8_acc"), ("int8_static", "test/int8_static_acc")):
            clean = rows[(rows.model == model) & (rows.input == "clean")]
            if not clean.empty:
                headline[tag] = (clean.acc.iloc[0], f"{model}, clean, {clean.images.iloc[0]:,} images")
        return headline

    def rows_with_kinds(self) -> pd.DataFrame:
        """The rows with their ``InputKind`` in column ``kind``."""
        return pd.DataFrame(self.rows)

    def details(self) -> pd.DataFrame:
        """``results.csv``: what each row measures, its numbers, and the attack-failure checks that flag it."""
        rows = self.rows_with_kinds()
        if rows.empty:
            return rows
        flag = [self.flag_of(model, name) for model, name in zip(rows.model, rows.input)]
        return rows.drop(columns="kind").assign(flag=flag)

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_dict(self.summary, orient="index").rename_axis("model").reset_index()

    def per_class_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_dict(self.per_class, orient="index", columns=list(CLASSES))

    def tables(self) -> dict[str, str]:
        """Each table as markdown, by TensorBoard text tag suffix; TensorBoard lists them by name, the
        summary first. The summary is transposed (a column per model) so that it stays readable in
        a narrow window."""
        details = self.details()
        notes = " ".join(note for threat, note in THREAT_NOTES.items() if threat in set(details.get("threat", [])))
        if details.get("input", pd.Series(dtype=str)).str.startswith("autoattack.").any():
            notes += " " + AUTOATTACK_NOTE
        headline = pd.DataFrame([(HEADLINE[tag], value, what) for tag, (value, what) in self.headline().items()],
                                columns=["headline", "accuracy", "of what"])
        # Transposed, each column mixes numbers and text, so the cells are formatted here; blank: not measured.
        summary = self.summary_frame().set_index("model").T.rename_axis("FP32 and int8").map(_cell)
        return {
            "summary": ("".join(f"Note: {note}\n\n" for note in self.notes)
                        + "".join(f"**Flag** ({f.model}, {', '.join(f.inputs)}): {f.reason}.\n\n" for f in self.flags)
                        + headline.to_markdown(index=False, floatfmt=".4f") + "\n\n"
                        + summary.to_markdown(disable_numparse=True)),
            "tables/every_input": notes + "\n\n" + details.map(_cell).to_markdown(index=False, disable_numparse=True),
            "tables/per_class": self.per_class_frame().to_markdown(floatfmt=".3f"),
            "tables/stage_times": self.timings_frame().to_markdown(index=False, floatfmt=".1f"),
        }

    def markdown(self) -> str:
        titles = {"summary": "Summary", "tables/every_input": "Every input kind",
                  "tables/per_class": "Accuracy per class", "tables/stage_times": "Wall time per stage"}
        return "\n\n".join(f"## {titles[name]}\n\n{table}" for name, table in self.tables().items())

    def timings_frame(self) -> pd.DataFrame:
        seconds = pd.Series(self.stage_seconds, name="seconds").rename_axis("stage").reset_index()
        return seconds.assign(percent=100 * seconds.seconds / seconds.seconds.sum())

    def write(self, folder: Path, figures: dict[str, plt.Figure]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "results.csv", self.details().to_csv(index=False).encode())
        write_atomic(folder / "summary.csv", self.summary_frame().to_csv(index=False).encode())
        write_atomic(folder / "per_class.csv", self.per_class_frame().rename_axis("rows").to_csv().encode())
        write_atomic(folder / "results.md", (self.markdown() + "\n").encode())
        if self.robust_masks is not None:
            write_atomic(folder / "robust_masks.csv", self.robust_masks.to_csv(index=False).encode())
        for name, figure in figures.items():
            write_atomic(folder / f"{name}.png", figure_png(figure))


def _show(axis: plt.Axes, image: Tensor, title: str, correct: bool) -> None:
    """The image framed green (right) or red (wrong): the frame reads at any size, the title when zoomed in."""
    color = "tab:green" if correct else "tab:red"
    axis.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
    axis.set_title(title, fontsize=9, color=color, pad=2)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set(color=color, linewidth=3)


def _caption(probabilities: Tensor) -> tuple[str, int]:
    confidence, label = probabilities.max(dim=0)
    return f"{CLASSES[label]} {confidence:.0%}", int(label)


def prediction_figure(images: dict[str, Tensor], predictions: dict[str, dict[str, Tensor]], label: int,
                      title: str) -> plt.Figure:
    """One row per input kind (clean, FGSM, each defense), one column per model, each image titled
    with the model's prediction and confidence: narrow, so it reads at TensorBoard's card size.

    ``images``: input kind → (3, H, W) in [0, 1]; ``predictions``: model → input kind → probabilities.
    """
    rows, columns = len(images), len(predictions)
    figure, axes = plt.subplots(rows, columns, figsize=(1.5 * columns + 0.6, 1.45 * rows + 0.5), squeeze=False,
                                layout="constrained")
    for column, (model, probabilities) in enumerate(predictions.items()):
        axes[0, column].annotate(model, (0.5, 1.25), xycoords="axes fraction", ha="center", fontsize=10,
                                 fontweight="bold")
        for row, (kind, image) in enumerate(images.items()):
            caption, predicted = _caption(probabilities[kind])
            _show(axes[row, column], image, caption, predicted == label)
    for row, kind in enumerate(images):
        axes[row, 0].set_ylabel(kind, fontsize=9)
    figure.suptitle(f"{title}\ntrue class: {CLASSES[label]}; green = right, red = wrong", fontsize=10)
    return figure


def sample_grid(samples: list[tuple[dict[str, Tensor], dict[str, Tensor], int]], model: str) -> plt.Figure:
    """One row per sample ``(images, probabilities, label)``, one column per input kind; the frames
    say right or wrong, the titles what the model saw."""
    kinds = list(samples[0][0])
    figure, axes = plt.subplots(len(samples), len(kinds), figsize=(1.3 * len(kinds) + 0.6, 1.4 * len(samples) + 0.8),
                                squeeze=False, layout="constrained")
    for row, (images, probabilities, label) in enumerate(samples):
        for column, kind in enumerate(kinds):
            caption, predicted = _caption(probabilities[kind])
            _show(axes[row, column], images[kind], CLASSES[predicted], predicted == label)
        axes[row, 0].set_ylabel(CLASSES[label], fontsize=9)
    for column, kind in enumerate(kinds):
        axes[0, column].annotate(kind.replace("/", "\n"), (0.5, 1.3), xycoords="axes fraction", ha="center",
                                 va="bottom", fontsize=9, fontweight="bold")
    figure.suptitle(f"{model}: one image per class that FGSM flips; green = right, red = wrong", fontsize=10)
    return figure


def eps_curve(eps: list[float], accuracy: dict[str, list[float]], title: str) -> plt.Figure:
    """Accuracy against the budget ε, one line per attack and defense."""
    figure, axis = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    for curve, values in accuracy.items():
        axis.plot([e * 255 for e in eps], values, marker="o", label=curve, linestyle="--" if "subset" in curve else "-")
    axis.set_xlabel("ε (grey levels of 255)")
    axis.set_ylabel("test accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    return figure


def _bar_kind(kind: InputKind) -> str:
    """The bar chart's row of a results row: the strong attacks (and the transfer and white-box attacks
    on models without gradients) fold into their worst case."""
    if kind.threat in ("white-box", "transfer", "white-box (surrogate)"):
        return f"strongest attack, L2 ε = {kind.eps:g} (subset)" if kind.norm == "L2" else "strongest attack (subset)"
    name = {"none": "clean", "non-adaptive": "FGSM", "adaptive": "adaptive PGD"}[kind.threat]
    return f"{name} → {kind.defense}" if kind.defense else name


def accuracy_bars(rows: pd.DataFrame, eps: float) -> plt.Figure:
    """The headline figure: a bar per model for each input kind at the main ε (the defenses on
    attacked images; their cost on clean ones, the ε sweep and the corruptions stay in the tables and
    :func:`corruption_bars`).

    ``rows``: ``Report``'s rows with their ``InputKind`` in column ``kind``."""
    shown = rows[rows.kind.map(lambda kind: not kind.sweep and not kind.corruption and (kind.attacked or not kind.defense))]
    table = (shown.assign(bar=shown.kind.map(_bar_kind)).groupby(["bar", "model"], sort=False).acc.min()
             .unstack("model"))
    models = list(dict.fromkeys(shown.model))
    figure, axis = plt.subplots(figsize=(5.5, 0.17 * len(table) * len(models) + 1.2), layout="constrained")
    height = 0.8 / len(models)
    for position, model in enumerate(models):
        offsets = np.arange(len(table)) + (position - (len(models) - 1) / 2) * height
        bars = axis.barh(offsets, table[model].fillna(0), height=height, label=model)
        axis.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0%}" for v in table[model]], fontsize=8, padding=2)
    axis.set_yticks(np.arange(len(table)), table.index, fontsize=10)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.1)
    axis.xaxis.set_major_formatter(PercentFormatter(1.0))
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=9, loc="lower right")
    axis.set_title(f"Test accuracy at ε = {eps_label(eps)}", fontsize=11)
    return figure


def corruption_bars(rows: pd.DataFrame, title: str) -> plt.Figure:
    """Accuracy under each common corruption, the mean over its severities, a bar per model (or per run:
    the ``model`` column names the bars), beside the same images uncorrupted.

    ``rows``: ``results.csv`` rows (``threat``, ``corruption``, ``severity``, ``model``, ``acc``)."""
    shown = rows[rows.threat == "corruption"].replace({"corruption": {"none": "clean (same images)"}})
    table = shown.groupby(["corruption", "model"], sort=False).acc.mean().unstack("model")
    models = list(dict.fromkeys(shown.model))
    figure, axis = plt.subplots(figsize=(6, 0.16 * len(table) * len(models) + 1.4), layout="constrained")
    height = 0.8 / len(models)
    for position, model in enumerate(models):
        offsets = np.arange(len(table)) + (position - (len(models) - 1) / 2) * height
        bars = axis.barh(offsets, table[model], height=height, label=model)
        axis.bar_label(bars, labels=[f"{v:.0%}" for v in table[model]], fontsize=7, padding=2)
    axis.set_yticks(np.arange(len(table)), [name.replace("_", " ") for name in table.index], fontsize=9)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.1)
    axis.xaxis.set_major_formatter(PercentFormatter(1.0))
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    axis.set_title(title, fontsize=10)
    return figure
