"""What a person sees first in TensorBoard: a test run's headline numbers and its HPARAMS row.

TensorBoard's HPARAMS tab shows, until the user ticks more in its sidebar, the first five
hyperparameters and the first five metrics that the experiment declares, in the declared order,
and it takes the declaration from the first run it finds. So every test run declares the same
columns (:data:`HPARAMS`, :data:`HEADLINE`), the ones that matter first, and the table, parallel
coordinates and scatter plot compare runs side by side as they open. Training runs declare none:
their curves are compared in the SCALARS tab, and a test run carries the recipe of its weights.
"""

from collections.abc import Mapping
from datetime import datetime

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.plugins.hparams import summary_v2 as hp

# Headline scalars of a test run, tag → column title; accuracy first, the five that matter most first.
HEADLINE = {
    "test/acc": "clean acc",
    "test/fgsm_acc": "FGSM acc",
    "test/strongest_attack_acc": "strongest attack acc",
    "test/best_defense_acc": "best defense acc",
    "test/int8_acc": "int8 acc",
    "test/int8_static_acc": "int8 static acc",
    "test/acc_flip_average": "clean acc, flip average",
    "test/autoattack_acc": "AutoAttack acc",
    "test/l2_acc": "L2 strongest attack acc",
    "test/corruption_acc": "corruption acc",
}

# A test run's hyperparameters, name → column title: what the weights were trained with and how they were tested.
# TensorBoard orders them by name and shows five by default; a table 1,600 px wide has room for four beside
# the five headline metrics (the strong attacks' settings are in the summary text).
HPARAMS = {
    "adversarial_training": "adversarial training",
    "defenses": "defenses",
    "eps_test": "test ε",
    "recipe": "recipe",
}


def eps_label(eps: float) -> str:
    """A budget as people write it: 8/255 when it is a whole number of grey levels, else 0.03."""
    levels = eps * 255
    return f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-6 else f"{eps:g}"


def training_hparams(hparams: Mapping, epochs: int, batch_size: int | None) -> dict[str, str]:
    """The HPARAMS values of the recipe that trained the weights: ``hparams`` are
    ``ClassifierModule``'s as saved in the checkpoint (older checkpoints lack the newer keys), the
    batch size the data module's (None: not saved with the weights)."""
    method = hparams.get("adversarial", "none")
    training = method if method == "none" else f"{method}, ε {eps_label(hparams['adversarial_eps'])}"
    optimizer = f"{hparams.get('optimizer', 'adamw')} {hparams.get('schedule', 'plateau')} lr {hparams.get('lr')}"
    batch = f", batch {batch_size}" if batch_size else ""
    return {
        "adversarial_training": training,
        "recipe": f"{epochs} epoch{'' if epochs == 1 else 's'}, {optimizer}, weight decay {hparams.get('weight_decay')}, "
                  f"label smoothing {hparams.get('label_smoothing')}{batch}",
    }


# The recipe of weights from outside the project (a state_dict, a TorchScript file…): nothing says it.
UNKNOWN_RECIPE = {"adversarial_training": "not known", "recipe": "not known"}


def trial_name(weights: str, eps: float, tested_at: datetime) -> str:
    """A test run's trial ID in the HPARAMS table. TensorBoard averages the metrics of every run with
    the same trial ID, as repeats of one trial; so it names the weights, the budget and the time of
    the test, and two studies of one checkpoint (at 0.03 and at 8/255, say) stay two rows."""
    return f"{weights} · ε {eps_label(eps)} · {tested_at:%Y-%m-%d %H:%M:%S}"


def log_hparams(logger: object, hparams: Mapping[str, object], trial: str) -> None:
    """Write the run's HPARAMS row, named ``trial`` (``hparams``: keys of :data:`HPARAMS`), and the
    shared column declaration; the metric values are the run's headline scalars, logged on their own."""
    unknown = set(hparams) - set(HPARAMS)
    if unknown:
        raise KeyError(f"log_hparams: {sorted(unknown)} are not HPARAMS columns ({', '.join(HPARAMS)})")
    if not isinstance(logger, TensorBoardLogger):
        return
    writer = logger.experiment._get_file_writer()  # as Lightning's own TensorBoardLogger.log_hyperparams
    writer.add_summary(hp.hparams_config_pb(
        hparams=[hp.HParam(name, display_name=title) for name, title in HPARAMS.items()],
        metrics=[hp.Metric(tag, display_name=title) for tag, title in HEADLINE.items()],
    ))
    writer.add_summary(hp.hparams_pb(dict(hparams), trial_id=trial))
    writer.flush()
