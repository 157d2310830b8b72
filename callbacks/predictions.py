"""`cifar-lightning predict`: each test image's prediction, in the run folder's predictions.csv."""

from pathlib import Path

import lightning as L
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from cifar_lightning.data import CLASSES
from cifar_lightning.files import write_atomic


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` into the run folder (``lightning_logs/version_N/``): per test image,
    in index order, its ``index`` in the test set, its ``label``, the ``predicted`` class (index and
    ``predicted_class`` name) and the ``confidence``, the probability the model gives that class.

    Takes ``ClassifierModule.predict_step``'s outputs. Under DDP each rank predicts its shard of the
    test set (no image twice); rank 0 gathers them and writes the file, atomically.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: list[dict],
                           batch_indices: list[list[list[int]]]) -> None:
        log_dir = Path(trainer.log_dir)  # a broadcast under DDP: every rank must ask for it
        # `predictions` holds the batches of the one dataloader; `batch_indices` per dataloader, then per batch.
        [indices] = batch_indices
        probabilities = torch.cat([batch["probabilities"] for batch in predictions])
        confidence, predicted = probabilities.max(1)
        table = {"index": [index for batch in indices for index in batch],
                 "label": torch.cat([batch["labels"] for batch in predictions]).tolist(),
                 "predicted": predicted.tolist(), "confidence": confidence.tolist()}
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, table)
            table = {key: [value for part in gathered for value in part[key]] for key in table}
        if not trainer.is_global_zero:
            return
        frame = pd.DataFrame(table).sort_values("index")
        frame.insert(3, "predicted_class", [CLASSES[p] for p in frame.predicted])
        log_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(log_dir / "predictions.csv", frame.to_csv(index=False).encode())
        print(f"\nPredictions of {len(frame)} test images in {log_dir / 'predictions.csv'}")
