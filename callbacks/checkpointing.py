"""LastCheckpoint: the run's ``last.ckpt``, always the newest state of ``fit`` that can be resumed."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` (into the run's ``checkpoints/`` folder) every ``every_n_train_steps``
    training steps, after every validation, at the end of ``fit``, and at the step a SIGTERM stops
    ``fit`` at.

    Lightning's ``save_last`` writes ``last.ckpt`` only when the callback saves another checkpoint
    too: a best-model checkpoint saves none after an epoch that did not improve, and a periodic one
    none between its steps. So after such an epoch ``last.ckpt`` would be older than the run, a
    resume would train steps again, and a scheduler's kill (SIGTERM, then SIGKILL) would lose up
    to ``every_n_train_steps`` steps. Other exceptions leave ``last.ckpt`` as it was: the state they
    stop at (a diverged loss, a crash mid-step) is not one to resume from. ``fast_dev_run`` writes
    nothing, as with Lightning's own checkpoints.

    Args:
        every_n_train_steps: training steps between two writes within an epoch (0: at validations only).
    """

    def __init__(self, every_n_train_steps: int = 200) -> None:
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 0:
            raise ValueError(f"LastCheckpoint: every_n_train_steps={every_n_train_steps!r} must be an integer >= 0, "
                             f"e.g. 200")
        super().__init__(every_n_train_steps=every_n_train_steps or None, save_top_k=0, save_last=True,
                         enable_version_counter=False)

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # After the validation, where ModelCheckpoint saves: at the end of the training epoch when the
    # validation runs once at its end (so the best-model callback, listed before, has taken the new
    # score and the checkpoint holds it), else at the validation's end.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_last_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit that ends between validations (max_steps) ends at a step no hook above saved;
        # ModelCheckpoint's own on_train_end would save even under fast_dev_run.
        self._save_last_now(trainer)
