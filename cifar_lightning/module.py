"""ClassifierModule: trains any image classifier on [0, 1] CIFAR-10 batches."""

import math

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.data import CIFAR10_MEAN, CIFAR10_STD
from cifar_lightning.models import ImprovedCNN, Normalized


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of ``network`` with AdamW and ReduceLROnPlateau on ``val/loss``.

    ``self.net`` is ``Normalized(network)``: it takes images in [0, 1], which is what the data
    module yields and what attacks and defenses need. Weights and inputs use channels_last, the
    faster memory format for convolutions on CPU and on GPU tensor cores.

    Args:
        network: the classifier, taking normalised (N, 3, 32, 32) images; ImprovedCNN by default.
        num_classes: outputs of ``network`` (used when it is None).
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        label_smoothing: cross-entropy label smoothing of the training loss (val/test use none).
        plateau_factor: ReduceLROnPlateau multiplies the learning rate by this ...
        plateau_patience: ... after this many epochs without a lower ``val/loss``.
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        label_smoothing: float = 0.1,
        plateau_factor: float = 0.3,
        plateau_patience: int = 2,
    ) -> None:
        super().__init__()
        for name, value, valid, rule in [
            ("lr", lr, lr > 0, "> 0, e.g. 1e-3"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0, e.g. 0.01"),
            ("label_smoothing", label_smoothing, 0.0 <= label_smoothing < 1.0, "in [0, 1), e.g. 0.1"),
            ("plateau_factor", plateau_factor, 0.0 < plateau_factor < 1.0, "in (0, 1), e.g. 0.3"),
            ("plateau_patience", plateau_patience, plateau_patience >= 0, ">= 0 epochs, e.g. 2"),
        ]:
            if not valid:
                raise ValueError(f"ClassifierModule: {name}={value} must be {rule}")
        self.save_hyperparameters()  # before `network` is filled in: it reads the arguments as given
        network = network if network is not None else ImprovedCNN(num_classes)
        self.net = Normalized(network, CIFAR10_MEAN, CIFAR10_STD).to(memory_format=torch.channels_last)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": metric
                for stage in ("train", "val", "test")
                for name, metric in (("loss", MeanMetric()), ("acc", MulticlassAccuracy(num_classes, average="micro")))
            }
        )

    def forward(self, images: Tensor) -> Tensor:
        """Logits for images in [0, 1] of shape (N, 3, H, W)."""
        return self.net(images.contiguous(memory_format=torch.channels_last))

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
        self.metrics[f"{stage}_loss"].update(loss, weight=len(labels))
        self.metrics[f"{stage}_acc"].update(logits, labels)
        for name in ("loss", "acc"):
            self.log(f"{stage}/{name}", self.metrics[f"{stage}_{name}"], on_step=False, on_epoch=True,
                     prog_bar=stage != "test", batch_size=len(labels))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}. "
                f"Fix: lower --model.lr (now {self.hparams.lr}) or check the input data."
            )
        return loss

    def on_train_epoch_end(self) -> None:
        # Lightning does not step epoch-interval schedulers at the end of the epoch a resumed run restarts
        # in, as the metrics may be missing. When that epoch did validate, step ReduceLROnPlateau here, so
        # a run resumed mid-epoch follows the schedule of one never interrupted.
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if self.trainer.fit_loop.restarting and val_loss is not None:
            self.lr_schedulers().step(val_loss)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.hparams.plateau_factor, patience=self.hparams.plateau_patience
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}
