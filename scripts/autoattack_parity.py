"""The project's AutoAttack (``RobustnessEvaluation autoattack: standard``) beside the official one, image by image.

    # 1. the official AutoAttack (github fra31/auto-attack; not on PyPI: clone it, pass its folder) on the
    #    images a study's subset holds (the same --subset and --seed as the study: the same images)
    .venv/bin/python scripts/autoattack_parity.py official weights/improvedcnn_cifar10_adv.ckpt \
        --reference ../auto-attack --data_dir ../shared/cifar10 --eps 8/255 --subset 500 --out official.csv
    # 2. a `cifar-lightning test` run with `autoattack: standard` at that ε and subset, against it
    .venv/bin/python scripts/autoattack_parity.py compare lightning_logs/version_N official.csv

``official`` runs ``AutoAttack(norm="Linf", version="standard")`` (APGD-CE, APGD-T, FAB-T, Square at
their published budgets, seed 0) on the weights in pixel space and writes, per image, whether the
model still classifies it correctly. ``compare`` prints both accuracies, their difference, and the
images only one of the two broke. Both runs start from the same clean predictions, so the difference
is the attacks' alone; random starts differ, so a few images can go either way.
"""

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

import pandas as pd
import torch

from cifar_lightning.data import load_cifar10
from cifar_lightning.evaluation import stratified_subset
from cifar_lightning.frozen import frozen_copy
from cifar_lightning.loading import load_model
from cifar_lightning.models import CIFAR10_NORMALIZATION, ImprovedCNN, pixel_input

STANDARD = ["apgd-ce", "apgd-t", "fab-t", "square"]  # AutoAttack's standard version, in its order


def budget(text: str) -> float:
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--eps {text!r} is not a number. Fix: e.g. 8/255 or 0.0314") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--eps {text} is outside (0, 1]: the budget is in [0, 1] pixels")
    return value


def import_autoattack(reference: Path | None):
    if reference is not None:
        if not (reference / "autoattack" / "autoattack.py").is_file():
            sys.exit(f"--reference {reference} holds no autoattack/autoattack.py. Fix: pass the folder of a clone "
                     f"of github.com/fra31/auto-attack")
        sys.path.insert(0, str(reference))
    try:
        from autoattack import AutoAttack
    except ImportError:
        sys.exit("The official AutoAttack is not importable. Fix: clone github.com/fra31/auto-attack and pass "
                 "--reference <its folder> (it is not on PyPI)")
    return AutoAttack


def official(args: argparse.Namespace) -> None:
    if args.members != STANDARD[:len(args.members)]:
        sys.exit(f"--members {' '.join(args.members)} is not a prefix of the standard version's order. "
                 f"Fix: e.g. --members {' '.join(STANDARD[:2])}")
    AutoAttack = import_autoattack(args.reference)
    torch.manual_seed(0)
    network = load_model(args.weights, ImprovedCNN())
    model = frozen_copy(pixel_input(network, CIFAR10_NORMALIZATION).eval())  # as `cifar-lightning test`
    images, labels = load_cifar10(args.data_dir, train=False)
    indices = stratified_subset(labels, args.subset, args.seed)
    x, y = images[indices].float().div(255), labels[indices]
    attack = AutoAttack(model, norm="Linf", eps=args.eps, version="standard", device="cpu", verbose=True)
    attack.attacks_to_run = args.members  # the standard version's settings, its members or a prefix of them
    started = time.perf_counter()
    adversarial = attack.run_standard_evaluation(x, y, bs=args.batch_size)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        robust = model(adversarial).argmax(dim=1) == y
    pd.DataFrame({"index": indices.numpy(), "label": y.numpy(), "robust": robust.int().numpy(),
                  "members": "+".join(args.members)}).to_csv(args.out, index=False)
    print(f"official AutoAttack ({', '.join(args.members)}): {robust.float().mean().item():.2%} robust of {len(y)} images in {seconds:.0f} s; "
          f"per image in {args.out}")


def compare(args: argparse.Namespace) -> None:
    masks_path = args.run / "robust_masks.csv"
    if not masks_path.is_file():
        sys.exit(f"{args.run} has no robust_masks.csv. Fix: pass the folder of a `cifar-lightning test` run")
    ours, theirs = pd.read_csv(masks_path), pd.read_csv(args.official)
    members = theirs["members"].iloc[0].split("+") if "members" in theirs else STANDARD
    column = f"fp32/autoattack.{members[-1]}"  # robust_masks.csv: robust after that member of the standard version
    if column not in ours:
        sys.exit(f"{masks_path} has no {column} column. Fix: run the study with RobustnessEvaluation "
                 f"autoattack: standard")
    missing = sorted(set(theirs["index"]) - set(ours["index"]))
    if missing:
        sys.exit(f"{args.official} has {len(missing)} images the run's subset lacks (first: {missing[0]}). Fix: "
                 f"run `official` with the study's subset and seed")
    both = theirs.merge(ours[["index", column]], on="index")
    mine, reference = both[column].astype(bool), both["robust"].astype(bool)
    print(f"{len(both)} images, robust after {' → '.join(members)} of the standard version\n"
          f"  official AutoAttack: {reference.mean():.2%} robust\n"
          f"  cifar-lightning:     {mine.mean():.2%} robust\n"
          f"  difference: {100 * (mine.mean() - reference.mean()):+.2f} points\n"
          f"  broken by the official one only: {int((mine & ~reference).sum())} "
          f"(indices {both['index'][mine & ~reference].tolist()[:20]})\n"
          f"  broken by cifar-lightning only:  {int((~mine & reference).sum())} "
          f"(indices {both['index'][~mine & reference].tolist()[:20]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("official", help="the official AutoAttack on a study's subset")
    run.add_argument("weights", type=Path, help="ImprovedCNN weights (any format load_model reads)")
    run.add_argument("--reference", type=Path, help="a clone of github.com/fra31/auto-attack")
    run.add_argument("--data_dir", type=Path, default=Path("data"))
    run.add_argument("--eps", type=budget, default=8 / 255, help="L∞ budget in [0, 1] pixels (default 8/255)")
    run.add_argument("--subset", type=int, default=1000, help="the study's subset size (default 1000)")
    run.add_argument("--seed", type=int, default=0, help="the study's seed (default 0)")
    run.add_argument("--batch_size", type=int, default=500)
    run.add_argument("--members", nargs="+", choices=STANDARD, default=STANDARD,
                     help="run only these members, at the standard version's settings (default all four; "
                          "FAB-T and Square take ~80%% of the time and on the shipped robust weights broke nothing)")
    run.add_argument("--out", type=Path, default=Path("official_autoattack.csv"))
    against = commands.add_parser("compare", help="a study's autoattack.square column against `official`'s file")
    against.add_argument("run", type=Path, help="a `cifar-lightning test` run folder")
    against.add_argument("official", type=Path, help="the file `official` wrote")
    args = parser.parse_args()
    official(args) if args.command == "official" else compare(args)


if __name__ == "__main__":
    main()
