"""Training throughput, side by side in one process: Lightning `fit`, a plain PyTorch loop, and
the seed notebook's pipeline.

`lightning` and `plain` train the same network (Normalized ImprovedCNN, channels_last) with the
same optimizer — the recipe's: AdamW (the default config) or SGD with Nesterov momentum
(configs/fast.yaml; its one-cycle schedule, a per-step cost, only `lightning` runs) — batch size,
data (CIFAR10DataModule's in-memory uint8 tensors) and batch augmentation. `seed` is the
notebook's way: a dataset of PIL images, per-image torchvision transforms (RandomCrop,
RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader, NCHW ImprovedCNN, AdamW. All run the
same number of steps after the same warm-up; the order rotates over repeats to share out drift.

    python benchmarks/train_throughput.py --data_dir ../shared/cifar10 --steps 30 --repeats 5 [--recipe fast]
"""

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch import nn

from cifar_lightning.data import CIFAR10DataModule, random_crop_flip
from cifar_lightning.module import ClassifierModule


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# ClassifierModule's arguments per recipe: its defaults are the default config's; the fast recipe's from its config.
RECIPES = {"default": {}, "fast": yaml.safe_load((CONFIGS / "fast.yaml").read_text())["model"]}


class _StepTimer(L.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def lightning_fit(datamodule: CIFAR10DataModule, recipe: dict, steps: int, warmup: int) -> float:
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=warmup + steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(ClassifierModule(**recipe), datamodule=datamodule)
    return steps * datamodule.hparams.batch_size / (timer.end - timer.start)


def plain_loop(datamodule: CIFAR10DataModule, recipe: dict, steps: int, warmup: int) -> float:
    module = ClassifierModule(**recipe)  # only its network and its optimizer
    net, optimizer = module.net.train(), module.make_optimizer()
    batches = iter(datamodule.train_dataloader())
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        images, labels = next(batches)
        images = random_crop_flip(images).float().div_(255).contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * datamodule.hparams.batch_size / (time.perf_counter() - start)


class _PilImages(torch.utils.data.Dataset):
    """The notebook's data path: each item a PIL image through per-image transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision import transforms

        from cifar_lightning.data import CIFAR10_MEAN, CIFAR10_STD

        self.images, self.labels = images.permute(0, 2, 3, 1).numpy(), labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def seed_pipeline(datamodule: CIFAR10DataModule, recipe: dict, steps: int, warmup: int) -> float:
    from cifar_lightning.models import ImprovedCNN

    images, labels = datamodule.train_set.tensors
    loader = torch.utils.data.DataLoader(_PilImages(images, labels), batch_size=datamodule.hparams.batch_size,
                                         shuffle=True, num_workers=2)
    net = ImprovedCNN().train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    batches = iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch_images, batch_labels = next(batches)
        loss = nn.functional.cross_entropy(net(batch_images), batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * datamodule.hparams.batch_size / (time.perf_counter() - start)


PIPELINES = {"lightning": lightning_fit, "plain": plain_loop, "seed": seed_pipeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/cifar10")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe", choices=list(RECIPES), default="default")
    args = parser.parse_args()

    datamodule = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size)
    datamodule.setup("fit")
    rates = {name: [] for name in PIPELINES}
    for repeat in range(args.repeats):
        names = list(PIPELINES)
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            torch.manual_seed(repeat)
            rates[name].append(PIPELINES[name](datamodule, RECIPES[args.recipe], args.steps, args.warmup))
    base = statistics.median(rates["plain"])
    print(f"recipe {args.recipe}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} steps after {args.warmup} warm-up, {args.repeats} repeats (median)")
    print(f"{'pipeline':<12}{'images/s':>10}{'vs plain':>10}   range over repeats")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<12}{median:>10.1f}{median / base:>10.3f}   {min(values):.1f} to {max(values):.1f}")


if __name__ == "__main__":
    main()
