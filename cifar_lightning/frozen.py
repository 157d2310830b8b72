"""The frozen, fast copy of a network that the study evaluates and attacks.

At test time the network is a fixed function run hundreds of thousands of times, so it pays to
rewrite it once: in eval mode a BatchNorm is an affine map, ``(x - mean) / sqrt(var + eps) · γ + β``,
which the convolution before it absorbs into its weights and bias. Measured on this project's
2-core CPU (``docs/benchmarks.md``): 1.2× the forward and the forward+backward throughput of
ImprovedCNN, the same predictions. ``torch.compile`` of the folded network gave no more there and
costs half a minute per process, so it is left out.

A second model that is this copy with a few layers swapped (the int8 dynamic copy swaps only the
Linear layers) need not run the layers before them again: :func:`joint_pass` computes both models'
logits in one pass.
"""

import copy
import operator
import warnings

import torch
from torch import fx, nn
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


@torch.no_grad()
def joint_pass(first: nn.Module, second: nn.Module) -> fx.GraphModule | None:
    """One module that returns ``(first(x), second(x))`` and runs the layers the two share once.

    ``second`` is ``first`` with some layers swapped or changed: the int8 dynamic copy of a folded
    network swaps its Linear layers, so the convolutions before them run once for both. Each layer
    that differs, and everything computed from it, runs twice: once as ``first``'s, once as ``second``'s.
    Both models on the CPU, taking (N, 3, 32, 32) images. None (run them one after the other) unless both
    are ``torch.fx`` graphs of the same code and a probe batch gives exactly each model's own logits.
    """
    if not (isinstance(first, fx.GraphModule) and isinstance(second, fx.GraphModule)) or first.code != second.code:
        return None
    root = nn.Module()
    root.first, root.second = first, second
    graph, shared, own = fx.Graph(), {}, {}
    for node in first.graph.nodes:
        if node.op == "output":
            (result,) = node.args
            graph.output((fx.map_arg(result, shared.__getitem__), fx.map_arg(result, lambda n: own.get(n, shared[n]))))
            break
        shared[node] = _copied(graph, node, shared.__getitem__, "first")
        if _differs(first, second, node) or any(n in own for n in node.all_input_nodes):
            own[node] = _copied(graph, node, lambda n: own.get(n, shared[n]), "second")
    joint = fx.GraphModule(root, graph).eval()
    probe = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)
    try:
        logits = joint(probe)
        exact = torch.equal(logits[0], first(probe)) and torch.equal(logits[1], second(probe))
    except RuntimeError:  # a model of another dtype or device than the probe's: run the two one after the other
        return None
    return joint if exact else None


def _copied(graph: fx.Graph, node: fx.Node, arg_map, owner: str) -> fx.Node:
    """``node`` added to ``graph``, its layer or attribute taken from ``owner`` (``first`` or ``second``)."""
    copied = graph.node_copy(node, arg_map)
    if node.op in ("call_module", "get_attr"):
        copied.target = f"{owner}.{node.target}"
    return copied


def _differs(first: fx.GraphModule, second: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s layer or attribute is another in ``second`` (another type or other values)."""
    if node.op == "call_module":
        mine, theirs = first.get_submodule(node.target), second.get_submodule(node.target)
        return type(mine) is not type(theirs) or any(
            not torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    if node.op == "get_attr":
        mine, theirs = (operator.attrgetter(node.target)(model) for model in (first, second))
        return not (torch.equal(mine, theirs) if isinstance(mine, torch.Tensor) else mine is theirs)
    return False
