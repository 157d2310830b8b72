"""The test run's report: tables (pandas), figures (matplotlib), atomic files, TensorBoard."""

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from torch import Tensor  # noqa: E402

from cifar_lightning.data import CLASSES  # noqa: E402

NON_ADAPTIVE_NOTE = (
    "`threat`: non-adaptive rows are FGSM crafted on the undefended FP32 model, then the defense: a "
    "non-adaptive attacker, who does not know the defense. The strong attacks run on the subset of `images`; each row "
    "counts an image as robust only if it survived every attack in `worst_of`. Adaptive rows attack "
    "through the defense (its exact gradient where it has one, the identity where not: BPDA). int8 "
    "`transfer` rows score the FP32 model's adversarial images; `white-box (surrogate)` rows attack a "
    "fake-quantized copy with the int8 model's own scales and score the real int8 model."
)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so a crash never leaves half a file behind."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def figure_png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


class Report:
    """Rows of results per (model, input kind) and one summary row per model."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.summary: dict[str, dict] = {}
        self.per_class: dict[str, dict[str, float]] = {}
        self.stage_seconds: dict[str, float] = {}
        self.robust_masks: pd.DataFrame | None = None  # per image of the strong attacks' subset

    def add(self, model: str, results: dict, describe) -> None:
        """``results`` from ``RobustnessMetrics.compute`` (every test image) or
        ``RobustAccuracy.compute`` (the strong attacks' subset); ``describe(input)`` as
        ``AttackSuite.describe``."""
        accuracy, success = results["acc"], results["attack_success"]
        for name, value in accuracy.items():
            self.rows.append({"model": model, "input": name, **describe(name), "images": results["images"],
                              "acc": value, "attack_success": success.get(name, float("nan"))})
        for name, per_class in results.get("acc_class", {}).items():
            self.per_class[f"{model} {name}"] = per_class
        row = self.summary.setdefault(model, {})
        if "clean" in accuracy:
            row |= {"test_images": results["images"], "clean_acc": accuracy["clean"], "fgsm_acc": accuracy["fgsm"],
                    "fgsm_success": success["fgsm"]}
        if results.get("agreement") is not None:
            row["agreement_with_fp32"] = results["agreement"]
        for name, value in accuracy.items():
            kind, _, defense = name.partition("/")
            if defense and kind in ("clean", "fgsm", "adaptive"):
                row[f"{defense}_{ {'fgsm': 'recovery', 'clean': 'clean', 'adaptive': 'adaptive'}[kind]}"] = value
            elif not defense and "_eps" not in kind and kind not in ("clean", "fgsm"):
                row[f"{kind}_acc"] = value  # the strong attacks at the main ε

    def add_model_info(self, model: str, **info) -> None:
        """Size, latency, device… for the summary row of ``model``."""
        self.summary.setdefault(model, {}).update(info)

    def hparams_metrics(self) -> dict[str, float]:
        """The numeric summary columns as ``summary/<model>/<column>``."""
        return {f"summary/{model}/{column}": float(value) for model, row in self.summary.items()
                for column, value in row.items() if isinstance(value, (int, float))}

    def details(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_dict(self.summary, orient="index").rename_axis("model").reset_index()

    def per_class_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_dict(self.per_class, orient="index", columns=list(CLASSES))

    def markdown(self) -> str:
        return "\n\n".join([
            "## Summary\n\n" + self.summary_frame().to_markdown(index=False, floatfmt=".4f"),
            "## Every input kind\n\n" + NON_ADAPTIVE_NOTE + "\n\n"
            + self.details().to_markdown(index=False, floatfmt=".4f"),
            "## Accuracy per class\n\n" + self.per_class_frame().to_markdown(floatfmt=".3f"),
            "## Wall time per stage\n\n" + self.timings_frame().to_markdown(index=False, floatfmt=".1f"),
        ])

    def timings_frame(self) -> pd.DataFrame:
        seconds = pd.Series(self.stage_seconds, name="seconds").rename_axis("stage").reset_index()
        return seconds.assign(percent=100 * seconds.seconds / seconds.seconds.sum())

    def write(self, folder: Path, figures: dict[str, plt.Figure]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "results.csv", self.details().to_csv(index=False).encode())
        write_atomic(folder / "summary.csv", self.summary_frame().to_csv(index=False).encode())
        write_atomic(folder / "results.md", (self.markdown() + "\n").encode())
        if self.robust_masks is not None:
            write_atomic(folder / "robust_masks.csv", self.robust_masks.to_csv(index=False).encode())
        for name, figure in figures.items():
            write_atomic(folder / f"{name}.png", figure_png(figure))


def _show(axis: plt.Axes, image: Tensor, title: str, correct: bool) -> None:
    axis.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
    axis.set_title(title, fontsize=8, color="tab:green" if correct else "tab:red")
    axis.set_xticks([])
    axis.set_yticks([])


def _caption(probabilities: Tensor) -> tuple[str, int]:
    confidence, label = probabilities.max(dim=0)
    return f"{CLASSES[label]} {confidence:.0%}", int(label)


def prediction_figure(images: dict[str, Tensor], predictions: dict[str, dict[str, Tensor]], label: int,
                      title: str) -> plt.Figure:
    """One column per input kind (clean, FGSM, each defense); one row of predictions per model.

    ``images``: input kind → (3, H, W) in [0, 1]; ``predictions``: model → input kind → probabilities.
    """
    rows, columns = len(predictions), len(images)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for row, (model, probabilities) in enumerate(predictions.items()):
        for column, (kind, image) in enumerate(images.items()):
            caption, predicted = _caption(probabilities[kind])
            _show(axes[row, column], image, f"{kind}\n{caption}" if row == 0 else caption, predicted == label)
        axes[row, 0].set_ylabel(model, fontsize=8)
    figure.suptitle(f"{title} (true class: {CLASSES[label]})", fontsize=10)
    return figure


def sample_grid(samples: list[tuple[dict[str, Tensor], dict[str, Tensor], int]], model: str) -> plt.Figure:
    """One row per sample ``(images, probabilities, label)``, one column per input kind."""
    columns = len(samples[0][0])
    figure, axes = plt.subplots(len(samples), columns, figsize=(1.5 * columns, 1.7 * len(samples)), squeeze=False)
    for row, (images, probabilities, label) in enumerate(samples):
        for column, (kind, image) in enumerate(images.items()):
            caption, predicted = _caption(probabilities[kind])
            _show(axes[row, column], image, f"{kind}\n{caption}" if row == 0 else caption, predicted == label)
        axes[row, 0].set_ylabel(CLASSES[label], fontsize=8)
    figure.suptitle(f"{model} predictions; green = correct, red = wrong", fontsize=10)
    return figure


def eps_curve(eps: list[float], accuracy: dict[str, list[float]], model: str) -> plt.Figure:
    """Accuracy against the budget ε, one line per attack and defense."""
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for curve, values in accuracy.items():
        axis.plot([e * 255 for e in eps], values, marker="o", label=curve, linestyle="--" if "subset" in curve else "-")
    axis.set_xlabel("ε (grey levels of 255)")
    axis.set_ylabel("test accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"{model}: accuracy against ε", fontsize=10)
    return figure
