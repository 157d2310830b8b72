"""StudyCallback: the base of the test-time callbacks, which drive one ``Study`` from ``trainer.test``."""

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from weakref import WeakKeyDictionary

import lightning as L
import torch.distributed as dist

from cifar_lightning.dashboard import UNKNOWN_RECIPE, training_hparams, trial_name
from cifar_lightning.evaluation import ModelUnderTest
from cifar_lightning.journal import FOLDER, Journal
from cifar_lightning.model_card import About
from cifar_lightning.study import Gather, Study, publish


@dataclass
class _Run:
    """The study of one ``trainer.test`` and how far it has got."""

    study: Study
    batches: set[int] = field(default_factory=set)
    indices: list[int] = field(default_factory=list)  # this process's test images, in order
    finished: bool = False
    published: bool = False


# One study per trainer, for the length of a `trainer.test`: every StudyCallback of the trainer shares it.
_RUNS: "WeakKeyDictionary[L.Trainer, _Run]" = WeakKeyDictionary()


def _gather(trainer: L.Trainer) -> Gather:
    if not (dist.is_available() and dist.is_initialized()):
        return lambda value: [value]

    def gather(value: object) -> list:
        gathered = [None] * trainer.world_size
        dist.all_gather_object(gathered, value)
        return gathered
    return gather


class StudyCallback(L.Callback):
    """A test-time callback that adds what it owns to the trainer's :class:`~cifar_lightning.study.Study`
    (:meth:`contribute`) and drives the study with every other ``StudyCallback`` of that trainer.

    The study's first model under test is the LightningModule's ``frozen_net()`` (``fp32``; a
    ``ClassifierModule``, whose ``test_step`` returns that model's logits of the batch). Each step of the
    study (a batch, the end of the epoch, writing the results) is done by whichever callback's hook
    runs first, once for all; so the callbacks work alone or together, listed in any order, and none
    reads another's state.
    """

    def contribute(self, study: Study, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Add this callback's attacks, defenses or models to ``study``, before the first batch."""
        raise NotImplementedError

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer not in _RUNS:
            _RUNS[trainer] = _Run(Study(ModelUnderTest("fp32", pl_module.frozen_net(), pl_module.device)))
        self.contribute(_RUNS[trainer].study, trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        run = _RUNS[trainer]
        if batch_idx in run.batches:
            return
        loader = trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, list) else loader
        if not run.study.begun:
            run.indices = list(loader.sampler)
            run.study.begin(loader.dataset.tensors[1], loader.batch_size, pl_module.device, self._journal(trainer),
                            run.indices)
        images, labels = batch
        start = batch_idx * loader.batch_size
        # The module's test_step returns the logits of this very model (its frozen_net()).
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        run.study.update(images, labels, run.indices[start:start + len(labels)], logits)
        run.batches.add(batch_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run = _RUNS[trainer]
        if not run.finished:
            run.finished = True
            show = trainer.is_global_zero and trainer.progress_bar_callback is not None
            run.study.finish(_gather(trainer), progress=show)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the study's files and its TensorBoard entries; rank 0 only."""
        run = _RUNS[trainer]
        if run.published:
            return
        run.published = True
        study = run.study
        log_dir = Path(trainer.log_dir)  # a broadcast under DDP: every rank must ask for it
        masks = study.robust_masks(_gather(trainer))
        if trainer.is_global_zero:
            figures, hparams = study.figures(), self._hparams(study, pl_module)
            weights = getattr(pl_module, "loaded_from", None) or trainer.ckpt_path
            name = Path(weights).stem if weights else "untrained"
            network = getattr(pl_module.net, "model", pl_module.net)
            about = About(name, type(network).__name__, hparams["adversarial_training"], hparams["recipe"])
            study.write(log_dir, figures, masks, about)  # first: nothing after it can lose the numbers
            if trainer.logger is not None:
                trial = trial_name(name, study.eps or 0.0, datetime.now())
                # test/acc and its flip average: the LightningModule's own.
                publish(study, trainer.logger, trainer.global_step, figures, hparams, trial,
                        logged_elsewhere=("test/acc", "test/acc_flip_average"))
        trainer.strategy.barrier()  # every rank's journal stays until rank 0 has written the results
        study.journal.remove()
        if not trainer.is_global_zero:
            return
        print(f"\nRobustness results in {log_dir / 'results.md'}\n\n"
              + study.report.summary_frame().to_string(index=False, float_format="{:.4f}".format))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "test":
            _RUNS.pop(trainer, None)

    @staticmethod
    def _journal(trainer: L.Trainer) -> Journal:
        """The study's journal, in the run folder (``journal.FOLDER``, a subfolder per rank under DDP: each
        rank's study has batches of its own); none without a logger's run folder. A SIGTERM stops the
        study before its next unit of work."""
        folder = Path(trainer.log_dir) / FOLDER if trainer.logger is not None else None
        if folder is not None and trainer.world_size > 1:
            folder = folder / f"rank{trainer.global_rank}"
        return Journal(folder, stop_requested=lambda: trainer.received_sigterm)

    @staticmethod
    def _hparams(study: Study, pl_module: L.LightningModule) -> dict[str, object]:
        """The run's HPARAMS row: the recipe of the weights tested (from their checkpoint), then this study."""
        trained = getattr(pl_module, "trained_with", None) or {"hparams": dict(pl_module.hparams),
                                                                "epochs": pl_module.current_epoch, "batch_size": None}
        recipe = UNKNOWN_RECIPE if getattr(pl_module, "loaded_from", None) else training_hparams(**trained)
        return recipe | study.hparams()
