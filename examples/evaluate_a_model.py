"""Judge a CIFAR-10 classifier from Python: the whole robustness study, no Trainer to write.

    .venv/bin/python examples/evaluate_a_model.py --data_dir ../shared/cifar10 --images 1000

Any ``nn.Module`` that maps (N, 3, 32, 32) images to 10 logits works. Here: the shipped weights, read
with ``load_model`` (a state_dict, safetensors, TorchScript or torch.export file works the same way;
a TorchScript or torch.export program needs no network class).
"""

import argparse

from cifar_lightning import evaluate
from cifar_lightning.loading import load_model
from cifar_lightning.models import ImprovedCNN

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--weights", default="weights/improvedcnn_cifar10.ckpt")
parser.add_argument("--data_dir", default="../shared/cifar10")
parser.add_argument("--images", type=int, default=1000, help="the first this many test images (10000: all)")
args = parser.parse_args()

model = load_model(args.weights, ImprovedCNN())
# ImprovedCNN takes CIFAR-10-normalised images (the default); a model of [0, 1] pixels: normalization=None.
results = evaluate(model, args.data_dir, eps=8 / 255, images=args.images, subset=max(1, args.images // 10))

print(results.summary[["model", "clean_acc", "fgsm_acc", "pgd_acc", "apgd-t_acc"]].to_string(index=False))
worst = results.results[results.results.threat == "white-box"].acc.min()
print(f"\nStrongest attack at 8/255 leaves {worst:.1%} of {len(results.robust_masks)} images; "
      f"every table is in {results.run_dir}")
