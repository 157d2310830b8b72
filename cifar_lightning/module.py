"""ClassifierModule: trains any image classifier on [0, 1] CIFAR-10 batches."""

import math
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_lightning.adversarial import TrainingAttack
from cifar_lightning.attacks import fgsm, pgd, run_attack
from cifar_lightning.data import CLASSES
from cifar_lightning.frozen import frozen_copy
from cifar_lightning.models import CIFAR10_NORMALIZATION, ImprovedCNN, check_normalization, pixel_input


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of ``network``: AdamW or SGD (Nesterov), with ReduceLROnPlateau on
    ``val/loss`` or a one-cycle learning rate (Smith & Topin 2019) over the whole fit.

    ``self.net`` is ``Normalized(network, normalization)``: it takes images in [0, 1], which is what
    the data module yields and what attacks and defenses need. A model file from outside
    (``loading.py``) is put in as ``self.net.model`` by the CLI. Weights and inputs use channels_last, the
    faster memory format for convolutions on CPU and on GPU tensor cores.

    Args:
        network: the classifier of (N, 3, 32, 32) images, returning (N, num_classes) logits; ImprovedCNN
            by default.
        normalization: what ``network`` takes: ``{mean: [r, g, b], std: [r, g, b]}`` for images
            standardised per channel, ``(x - mean) / std`` (CIFAR-10's by default, what ImprovedCNN
            takes), or None for images in [0, 1] as they are.
        num_classes: outputs of ``network`` (used when it is None).
        lr: the learning rate; with ``schedule="onecycle"`` its peak.
        weight_decay: AdamW's decoupled weight decay, or SGD's L2 penalty.
        label_smoothing: cross-entropy label smoothing of the training loss (val/test use none).
        optimizer: ``adamw``, or ``sgd`` (Nesterov momentum).
        momentum: SGD momentum (unused by AdamW).
        schedule: ``plateau`` (ReduceLROnPlateau on ``val/loss``, per epoch) or ``onecycle``
            (OneCycleLR, per step, over ``trainer.max_epochs``; warm-up then cosine annealing).
        plateau_factor: ReduceLROnPlateau multiplies the learning rate by this ...
        plateau_patience: ... after this many epochs without a lower ``val/loss``.
        warmup_fraction: share of the one-cycle steps spent raising the learning rate to ``lr``.
        adversarial: train on adversarial examples (``adversarial.TrainingAttack``): ``none`` (the
            standard recipe), ``fgsm_rs``, ``n_fgsm`` or ``pgd``.
        adversarial_eps, adversarial_alpha, adversarial_steps: its budget (L∞, pixel scale), step
            size (null: the method's default) and PGD steps.
        val_attack_images: validation images (the first of the fixed split) attacked every
            epoch at ``adversarial_eps`` to log ``val/fgsm_acc`` and ``val/pgd_acc`` (PGD-10); 0: off.
            Catastrophic overfitting (``val/pgd_acc`` collapsing while ``val/fgsm_acc`` climbs)
            stops the fit; the best checkpoint keeps the last good weights.
        fast: evaluate (validation, test, predict, and the test-time study's attacks) on a frozen copy
            of the network with BatchNorm folded into the convolutions (``frozen.frozen_copy``: the same
            predictions, faster); false: on ``self.net`` itself. Not a hyperparameter of the weights: a
            checkpoint does not keep it.
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        normalization: dict[str, Sequence[float]] | None = CIFAR10_NORMALIZATION,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        label_smoothing: float = 0.1,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.9,
        schedule: Literal["plateau", "onecycle"] = "plateau",
        plateau_factor: float = 0.3,
        plateau_patience: int = 2,
        warmup_fraction: float = 0.25,
        adversarial: Literal["none", "fgsm_rs", "n_fgsm", "pgd"] = "none",
        adversarial_eps: float = 8 / 255,
        adversarial_alpha: float | None = None,
        adversarial_steps: int = 10,
        val_attack_images: int = 0,
        fast: bool = True,
    ) -> None:
        super().__init__()
        for name, value, valid, rule in [
            ("lr", lr, lr > 0, "> 0, e.g. 1e-3"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0, e.g. 0.01"),
            ("label_smoothing", label_smoothing, 0.0 <= label_smoothing < 1.0, "in [0, 1), e.g. 0.1"),
            ("plateau_factor", plateau_factor, 0.0 < plateau_factor < 1.0, "in (0, 1), e.g. 0.3"),
            ("plateau_patience", plateau_patience, plateau_patience >= 0, ">= 0 epochs, e.g. 2"),
            ("optimizer", optimizer, optimizer in ("adamw", "sgd"), "'adamw' or 'sgd'"),
            ("momentum", momentum, 0.0 <= momentum < 1.0, "in [0, 1), e.g. 0.9"),
            ("schedule", schedule, schedule in ("plateau", "onecycle"), "'plateau' or 'onecycle'"),
            ("warmup_fraction", warmup_fraction, 0.0 < warmup_fraction < 1.0, "in (0, 1), e.g. 0.25"),
            ("val_attack_images", val_attack_images, val_attack_images >= 0, ">= 0, e.g. 1000 (0: off)"),
            ("adversarial_eps", adversarial_eps, val_attack_images == 0 or adversarial_eps != 0,
             "> 0 with val_attack_images > 0 (validation attacks of budget 0 attack nothing), e.g. 0.031 (8/255)"),
            ("num_classes", num_classes, num_classes == len(CLASSES), f"{len(CLASSES)}, the classes of CIFAR-10"),
        ]:
            if not valid:
                raise ValueError(f"ClassifierModule: {name}={value} must be {rule}")
        check_normalization(normalization, "ClassifierModule")
        # Before `network` is filled in: it reads the arguments as given. Not to the logger: a test run
        # shows the dashboard's own choice of them (`dashboard.HPARAMS`), not every argument.
        self.save_hyperparameters(logger=False, ignore=["fast"])
        self.fast = fast
        network = network if network is not None else ImprovedCNN(num_classes)
        with torch.no_grad():
            outputs = network.eval()(torch.zeros(1, 3, 32, 32)).shape[-1]
        network.train()
        if outputs != num_classes:
            raise ValueError(f"ClassifierModule: the network returns {outputs} logits, not num_classes={num_classes}. "
                             f"Fix: give the network {num_classes} outputs (e.g. init_args: {{num_classes: {num_classes}}})")
        self.net = pixel_input(network, normalization).to(memory_format=torch.channels_last)
        self.training_attack = TrainingAttack(adversarial, adversarial_eps, adversarial_alpha, adversarial_steps)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": metric
                for stage in ("train", "val", "test")
                for name, metric in (("loss", MeanMetric()), ("acc", MulticlassAccuracy(num_classes, average="micro")))
            }
            | {f"val_{attack}_acc": MulticlassAccuracy(num_classes, average="micro") for attack in ("fgsm", "pgd")}
            | {"test_acc_flip_average": MulticlassAccuracy(num_classes, average="micro")}
        )
        self.best_pgd_acc = 0.0  # for catastrophic overfitting; kept in checkpoints
        # The recipe behind the weights of the checkpoint last loaded (`dashboard.training_hparams`'s arguments).
        self.trained_with: dict | None = None
        # The model file from outside that `self.net.model` was loaded from (`loading.py`); None for a
        # Lightning checkpoint or an untrained network.
        self.loaded_from: str | None = None
        # `frozen_net()`'s copy, in a dict so that it is no submodule (not in the state_dict); emptied
        # whenever the weights change.
        self._frozen: dict[str, nn.Module] = {}

    def forward(self, images: Tensor) -> Tensor:
        """Logits for images in [0, 1] of shape (N, 3, H, W)."""
        return self.net(images.contiguous(memory_format=torch.channels_last))

    def frozen_net(self) -> nn.Module:
        """The network as validation, test and predict run it: with ``fast``, a frozen copy of
        ``self.net`` with BatchNorm folded (made on first use after the weights last changed: a
        training step, a checkpoint load); without, ``self.net`` itself. Takes [0, 1] images."""
        if not self.fast:
            return self.net
        if "net" not in self._frozen:
            self._frozen["net"] = frozen_copy(self.net)
        return self._frozen["net"]

    def _evaluate(self, images: Tensor) -> Tensor:
        return self.frozen_net()(images.contiguous(memory_format=torch.channels_last))

    def _step(self, logits: Tensor, labels: Tensor, stage: str) -> Tensor:
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
        self.metrics[f"{stage}_loss"].update(loss, weight=len(labels))
        self.metrics[f"{stage}_acc"].update(logits, labels)
        for name in ("loss", "acc"):
            self.log(f"{stage}/{name}", self.metrics[f"{stage}_{name}"], on_step=False, on_epoch=True,
                     prog_bar=stage != "test", logger=stage != "test", batch_size=len(labels))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        images = self.training_attack(self.net, images.contiguous(memory_format=torch.channels_last), labels)
        loss = self._step(self(images), labels, "train")
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}. "
                f"Fix: lower --model.lr (now {self.hparams.lr}) or check the input data."
            )
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._frozen.clear()  # the weights have changed

    def on_train_epoch_end(self) -> None:
        # Lightning does not step epoch-interval schedulers at the end of the epoch a resumed run restarts
        # in, as the metrics may be missing. When that epoch did validate, step ReduceLROnPlateau here, so
        # a run resumed mid-epoch follows the schedule of one never interrupted.
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if self.hparams.schedule == "plateau" and self.trainer.fit_loop.restarting and val_loss is not None:
            self.lr_schedulers().step(val_loss)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(self._evaluate(batch[0]), batch[1], "val")
        attacked = self.hparams.val_attack_images - batch_idx * self.trainer.val_dataloaders.batch_size
        if attacked > 0:
            images, labels = batch[0][:attacked], batch[1][:attacked]
            eps = self.hparams.adversarial_eps
            net = self.frozen_net()
            for name, attack in (("fgsm", fgsm(net, eps)), ("pgd", pgd(net, eps, steps=10))):
                metric = self.metrics[f"val_{name}_acc"]
                metric.update(self._evaluate(run_attack(attack, images, labels)), labels)
                self.log(f"val/{name}_acc", metric, on_step=False, on_epoch=True, prog_bar=name == "pgd",
                         batch_size=len(labels))

    def on_validation_epoch_end(self) -> None:
        """Catastrophic overfitting (Wong et al. 2020): robustness to PGD collapses within an epoch while
        FGSM accuracy climbs, and does not come back. Stop; the best checkpoint holds the weights before."""
        metrics = self.trainer.callback_metrics
        if self.trainer.sanity_checking or "val/pgd_acc" not in metrics:
            return
        pgd_acc, fgsm_acc = metrics["val/pgd_acc"].item(), metrics["val/fgsm_acc"].item()
        collapsed = self.best_pgd_acc > 0.1 and pgd_acc < self.best_pgd_acc / 2 and fgsm_acc > 2 * pgd_acc
        self.log("val/catastrophic_overfitting", float(collapsed), sync_dist=True)
        self.best_pgd_acc = max(self.best_pgd_acc, pgd_acc)
        if collapsed and self.trainer.training:
            rank_zero_warn(f"catastrophic overfitting at epoch {self.current_epoch}: val/pgd_acc fell to {pgd_acc:.3f} "
                           f"(best {self.best_pgd_acc:.3f}) while val/fgsm_acc is {fgsm_acc:.3f}; stopping. The best "
                           f"checkpoint keeps the last good weights.")
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["best_pgd_acc"] = self.best_pgd_acc

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._frozen.clear()  # the weights are about to change
        self.best_pgd_acc = checkpoint.get("best_pgd_acc", 0.0)
        self.trained_with = {"hparams": dict(checkpoint.get("hyper_parameters", {})), "epochs": checkpoint.get("epoch", -1) + 1,
                             "batch_size": checkpoint.get("datamodule_hyper_parameters", {}).get("batch_size")}

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Logs test/acc and its flip average; returns the batch's ``logits`` (N, classes) of
        ``frozen_net()``, which the test-time study (``callbacks.study``) then need not compute again."""
        images, labels = batch
        logits = self._evaluate(images)
        self._step(logits, labels, "test")
        # Test-time augmentation, an extra number beside test/acc and never in its place: the mean of the
        # probabilities of each image and of its mirror image (training flips images left to right too).
        flip_average = self.metrics["test_acc_flip_average"]
        flip_average.update(logits.softmax(1) + self._evaluate(images.flip(-1)).softmax(1), labels)
        self.log("test/acc_flip_average", flip_average, on_step=False, on_epoch=True, logger=False, batch_size=len(labels))
        return {"logits": logits}

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The class probabilities (N, classes) of a batch of images, and its labels (N,); written by
        ``callbacks.predictions.PredictionWriter``."""
        images, labels = batch
        return {"probabilities": self._evaluate(images).softmax(1), "labels": labels}

    def on_test_epoch_end(self) -> None:
        # By hand: `self.log` would also add a point to the training run's `epoch` chart.
        if self.logger is not None:
            self.logger.log_metrics({tag: self.metrics[tag.replace("/", "_")].compute().item()
                                     for tag in ("test/acc", "test/acc_flip_average")}, step=self.global_step)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimizer over the network's weights, without its schedule."""
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0,
                                   weight_decay=hp.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = self.make_optimizer()
        # `name`: LearningRateMonitor's tag, in the dashboard's train/ group rather than a group of its own.
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=hp.lr, total_steps=self.trainer.estimated_stepping_batches, pct_start=hp.warmup_fraction,
                cycle_momentum=hp.optimizer == "adamw" or hp.momentum > 0,
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=hp.plateau_factor, patience=hp.plateau_patience
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "name": "train/lr"}}
