"""The frozen, fast copy of a network that the study evaluates and attacks.

At test time the network is a fixed function run hundreds of thousands of times, so it pays to
rewrite it once: in eval mode a BatchNorm is an affine map, ``(x - mean) / sqrt(var + eps) · γ + β``,
which the convolution before it absorbs into its weights and bias. Measured on this project's
2-core CPU (``docs/benchmarks.md``): 1.2× the forward and the forward+backward throughput of
ImprovedCNN, the same predictions. ``torch.compile`` of the folded network gave no more there and
costs half a minute per process, so it is left out.
"""

import copy
import warnings

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

# Largest logit difference a folded copy may show on a random probe batch: float rounding is ~1e-5.
_TOLERANCE = 1e-3


# trainer.test runs its hooks in inference mode; the copy's weights must allow autograd (attacks).
@torch.inference_mode(False)
@torch.no_grad()
def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the convolution before it and
    no weight taking gradients (attacks need the image's gradient only); ``model`` is left as it was.

    Input and output as ``model``'s. A network ``torch.fx`` cannot trace (data-dependent control
    flow, a TorchScript or ``torch.export`` program) or whose folded copy disagrees with it is not
    folded: the result is a plain eval-mode copy, with a warning that says why. A model holding a
    TorchScript program is returned itself: it cannot be copied faithfully, and the study never
    changes a model.
    """
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return _unfolded(model.eval(), "a TorchScript program has no Python modules to rewrite")
    copied = _frozen(copy.deepcopy(model))
    device = next(copied.parameters(), torch.empty(0)).device
    probe = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        # Not in place: `copied` stays as it is, the reference of the probe.
        folded = _frozen(fuse(copied)).to(memory_format=torch.channels_last)
        difference = (folded(probe) - copied(probe)).abs().max().item()
    except Exception as err:  # noqa: BLE001 — any failure to trace or run it means: run the network as it is
        first_line = (str(err).splitlines() or [""])[0]
        return _unfolded(copied, f"torch.fx could not trace or run its folded copy ({type(err).__name__}: {first_line})")
    if not difference <= _TOLERANCE:  # also NaN
        return _unfolded(copied, f"its folded copy's logits differ by {difference:.3g}")
    return folded


def _frozen(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _unfolded(copied: nn.Module, reason: str) -> nn.Module:
    warnings.warn(f"the study runs the network without BatchNorm folding (slower, same numbers): {reason}", stacklevel=3)
    return copied
