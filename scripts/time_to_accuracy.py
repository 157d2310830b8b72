"""Epochs and wall minutes until a training run's validation accuracy first reaches each target,
from the run's TensorBoard events:

    .venv/bin/python scripts/time_to_accuracy.py lightning_logs/reference/fit lightning_logs/version_3 \
        --targets 0.80 0.85 0.8674 0.90

Minutes are wall time spent running: from each events file's creation to the epoch's
`val/acc` point, summed over the files of a resumed run (a killed session up to its last logged
scalar), so the pause between a kill and `--ckpt_path last` does not count. They are only as idle
as the machine was.
"""

import argparse
from pathlib import Path

import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAG = "val/acc"


def _scalars(file: Path) -> tuple[float, float, list]:
    """(wall times of the file's creation and of its last scalar, its ``TAG`` points). From the creation,
    not the first scalar: a run resumed mid-epoch trains the rest of that epoch before it logs anything.
    A file rewritten later (its events copied into a new file) has a creation after its scalars: then
    from its first scalar."""
    events = EventAccumulator(str(file), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if TAG not in tags:
        return float("inf"), float("inf"), []
    times = [event.wall_time for tag in tags for event in events.Scalars(tag)]
    return min(events.FirstEventTimestamp(), *times), max(times), events.Scalars(TAG)


def validation_curve(run: Path) -> pd.DataFrame:
    """One row per epoch (epoch, accuracy, running minutes) over every events file of ``run``."""
    files = sorted(map(_scalars, run.glob("events.out.tfevents.*")), key=lambda file: file[0])
    if not any(points for *_, points in files):
        raise SystemExit(f"time_to_accuracy: {run} has no {TAG!r} scalar. Fix: pass the folder of a fit run, "
                         f"e.g. lightning_logs/version_0")
    rows, minutes_before = [], 0.0
    for start, end, points in files:
        rows += [{"step": p.step, "acc": p.value, "minutes": minutes_before + (p.wall_time - start) / 60}
                 for p in points]
        minutes_before += (end - start) / 60  # a killed session's work after its last validation counts too
    # A run resumed mid-epoch validates that epoch once, after the resume: the n-th step is epoch n.
    curve = pd.DataFrame(rows).drop_duplicates("step", keep="last").reset_index(drop=True)
    return curve.assign(epoch=curve.index + 1)


def first_reaching(curve: pd.DataFrame, target: float) -> tuple[str, str]:
    reached = curve[curve.acc >= target]
    if reached.empty:
        return f"not reached ({curve.acc.max():.2%} best, {len(curve)} epochs)", ""
    row = reached.iloc[0]
    return str(int(row.epoch)), f"{row.minutes:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (each with events.out.tfevents.*)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.80, 0.85, 0.8674, 0.90])
    args = parser.parse_args()
    curves = {run: validation_curve(run) for run in args.runs}
    table = pd.DataFrame({"validation accuracy": [f"{t:.2%}" for t in args.targets]})
    for run, curve in curves.items():
        cells = [first_reaching(curve, target) for target in args.targets]
        table[f"{run}: epochs"] = [epochs for epochs, _ in cells]
        table[f"{run}: minutes"] = [minutes for _, minutes in cells]
    print(table.to_markdown(index=False, disable_numparse=True))


if __name__ == "__main__":
    main()
