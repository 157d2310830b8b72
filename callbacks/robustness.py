"""RobustnessEvaluation: FGSM and the defenses over the whole test set, the ε sweep and strong attacks on a subset."""

import lightning as L

from callbacks.study import StudyCallback
from cifar_lightning.attacks import AUTOATTACK_VERSIONS, ENSEMBLE_MEMBERS, check_at_least_one, check_eps, check_l2_eps
from cifar_lightning.checks import CHECKS, AttackChecks, check_checks
from cifar_lightning.data import CLASSES
from cifar_lightning.defenses import Defense, default_defenses
from cifar_lightning.evaluation import AttackSuite, StrongAttacks
from cifar_lightning.study import Study


class RobustnessEvaluation(StudyCallback):
    """During ``trainer.test``: attack every test batch with FGSM and apply each defense to the clean
    and the attacked images (the ε sweep's budgets on the subset's images); then run the strong attacks
    (PGD, the AutoAttack-style ensemble, the adaptive attack on each defense) on that fixed, seeded,
    class-stratified subset of the test set.
    Every model under test of the run's study (``callbacks.study.StudyCallback``) is scored on
    these images.

    TensorBoard gets what a person reads at a glance (``dashboard.py``): the headline accuracies
    as ``test/…`` scalars and the run's HPARAMS row; the tables as text (``test/summary``,
    ``test/tables/every_input``, ``…/per_class``, ``…/stage_times``); the figures as images. The run
    folder gets ``results.csv``, ``summary.csv``, ``per_class.csv``, ``results.md``, ``robust_masks.csv``
    (per image of the subset and input kind: robust or not) and the figures as PNG (rank 0).

    Args:
        eps: attack budget in [0, 1] pixel space (L∞).
        defenses: defenses to evaluate; the seed's four (Gaussian k3, JPEG q30, median k3, TV 0.1)
            by default.
        eps_sweep: further budgets for the accuracy-vs-ε curve (FGSM with and without each defense, and
            PGD, on the subset; ``sweep_on_subset: false`` for FGSM on every image).
        sweep_on_subset: the sweep's FGSM and defenses on the subset's images, where its PGD runs: the
            whole ε curve on one set of images, and of the sweep's model passes (most of a study's on
            every image) only the subset's share. False: on every test image.
        sample: the image of the seed's figure: a test-set index, or a class name for the first
            test image of that class that the model gets right and FGSM flips.
        strong_attacks: run the strong attacks on the subset.
        subset: test images the strong attacks run on (class-stratified, seeded); null for all.
        pgd_steps, pgd_restarts: PGD's steps (step size 2.5·ε/steps) and random starts.
        ensemble: AutoAttack members to run after PGD, from apgd-ce, apgd-t, fab-t, square.
        sweep_ensemble: run the ensemble at each ``eps_sweep`` budget too (PGD always runs there).
        adaptive: the adaptive PGD through each defense.
        seed: seed of the subset and of every random start.
        autoattack: ``standard`` to run AutoAttack as published (Croce & Hein 2020: APGD-CE, APGD-T,
            FAB-T, Square, with the paper's budgets, from the clean images) at ``eps`` beside the chain,
            rows ``autoattack.<member>``; ``apgd`` for its first two members alone (APGD-CE, APGD-T: a fifth
            of the cost, no AutoAttack accuracy); null: not.
        checks: attack-failure checks beside the strong attacks (``checks.CHECKS``: randomised, logits,
            zero_gradients, convergence, large_eps, black_box), each a flag with its reason on the rows it
            concerns; ``black_box`` also runs Square through each defense, counted in the adaptive rows.
        check_images: the subset's first images the costly checks (and Square through the defenses) run on.
        square_queries: Square's queries in the ``black_box`` checks (5,000 as in AutoAttack).
        l2_eps: the L2 threat model's budget (RobustBench's 0.5): on the subset, FGM, PGD-L2 and the
            ``ensemble`` under L2 from the clean images, rows ``l2.<attack>``; null: L∞ only.
    """

    def __init__(
        self,
        eps: float = 0.03,
        defenses: list[Defense] | None = None,
        eps_sweep: list[float] = (1 / 255, 2 / 255, 4 / 255, 16 / 255),
        sweep_on_subset: bool = True,
        sample: str | int = "ship",
        strong_attacks: bool = True,
        subset: int | None = 1000,
        pgd_steps: int = 20,
        pgd_restarts: int = 1,
        ensemble: list[str] = ("apgd-ce", "apgd-t"),
        sweep_ensemble: bool = False,
        adaptive: bool = True,
        seed: int = 0,
        autoattack: str | None = None,
        checks: list[str] = tuple(CHECKS),
        check_images: int = 100,
        square_queries: int = 5000,
        l2_eps: float | None = 0.5,
    ) -> None:
        owner = "RobustnessEvaluation"
        check_eps(owner, eps)
        for value in eps_sweep:
            check_eps(owner, value, "eps_sweep", allow_zero=True)  # the sweep's 0 is the clean point, dropped below
        if l2_eps is not None:
            check_l2_eps(owner, l2_eps, "l2_eps")
        check_at_least_one(owner, pgd_steps=pgd_steps, pgd_restarts=pgd_restarts)
        if subset is not None:
            check_at_least_one(owner, subset=subset)
        unknown = [name for name in ensemble if name not in ENSEMBLE_MEMBERS]
        if unknown:
            raise ValueError(f"{owner}: ensemble={list(ensemble)} has unknown attack {unknown[0]!r}; choose from "
                             f"{', '.join(ENSEMBLE_MEMBERS)}")
        if autoattack is not None and autoattack not in AUTOATTACK_VERSIONS:
            raise ValueError(f"{owner}: autoattack={autoattack!r} is not an AutoAttack version; choose "
                             f"{', '.join(AUTOATTACK_VERSIONS)}, or null for none")
        check_checks(owner, checks, check_images, square_queries)
        if isinstance(sample, str) and sample not in CLASSES:
            raise ValueError(f"{owner}: sample={sample!r} must be a test index or one of {CLASSES}")
        defenses = default_defenses() if defenses is None else defenses
        eps_sweep = sorted(set(eps_sweep) - {0.0, eps})
        self.suite = AttackSuite(eps, defenses, eps_sweep, sweep_on_subset)
        self.strong = StrongAttacks(eps, defenses, eps_sweep, pgd_steps, pgd_restarts, ensemble, sweep_ensemble,
                                    adaptive, seed, autoattack,
                                    square_queries if "black_box" in checks else None, l2_eps) if strong_attacks else None
        self.checks = AttackChecks(checks, check_images, square_queries)
        self.subset, self.seed, self.sample = subset, seed, sample

    def contribute(self, study: Study, trainer: L.Trainer | None = None, pl_module: L.LightningModule | None = None) -> None:
        study.set_attacks(self.suite, self.strong, self.subset, self.seed, self.sample, self.checks)
