"""int8 copies of a trained FP32 classifier, their size and their CPU latency.

Quantized kernels run on the CPU only, so every function here returns or measures CPU models.
``torch.ao.quantization`` is deprecated on recent torch (torchao replaces it) but is still the API
that quantizes these layers; its deprecation warnings, and only those, are silenced.
"""

import copy
import io
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# The deprecation warnings torch.ao.quantization emits on torch 2.14 (a filter's regex matches the
# start of the message).
_DEPRECATIONS = (
    # Every quantize_dynamic / prepare_fx / convert_fx call.
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated and will be removed"),
    # Once per process, when the first quantized weight is made (a C++ TORCH_WARN_ONCE).
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor "
                  r"creation functions .* are deprecated"),
    # Once per activation observer: the x86 qconfig sets reduce_range.
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers\.\s+"
                  r"reduce_range will be deprecated"),
)


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def _ao_quantization():
    """``(quantize_dynamic, get_default_qconfig_mapping, prepare_fx, convert_fx)`` from torch.ao."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as err:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.ao.quantization API this needs ({err}). Fix: install "
            "the torch this project pins (pip install 'torch>=2.4,<2.16'), or remove "
            "callbacks.quantization.QuantizationEvaluation from trainer.callbacks in the config."
        ) from None
    return quantize_dynamic, get_default_qconfig_mapping, prepare_fx, convert_fx


class QuantizationError(ValueError):
    """The quantizer cannot take this model; the message says why."""


def check_quantizable(model: nn.Module) -> None:
    """Raise :class:`QuantizationError` for a model torch.ao cannot quantize: a TorchScript program (no
    Python modules to swap) or one with no ``nn.Linear`` layer (a ``torch.export`` program has none)."""
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise QuantizationError("a TorchScript program cannot be quantized here (torch.ao needs the Python modules)")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise QuantizationError("the model has no nn.Linear layer, which dynamic int8 quantizes (a torch.export "
                                "program has none)")


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    # float32: the int8 kernels quantize from it, and a model tested at another precision (64-true) is not.
    return copy.deepcopy(model).cpu().float().eval()


def quantize_dynamic_linear(model: nn.Module) -> nn.Module:
    """A CPU eval-mode copy of ``model`` whose ``nn.Linear`` layers hold qint8 weights and quantize
    their input on the fly (dynamic quantization); every other layer stays FP32.

    ``model`` itself is left as it was (device, mode, weights).
    """
    quantize_dynamic, *_ = _ao_quantization()
    with _quiet_deprecations():
        return quantize_dynamic(_cpu_eval_copy(model), {nn.Linear}, dtype=torch.qint8)


@torch.no_grad()
def quantize_static(model: nn.Module, calibration_images: Tensor, batch_size: int = 128) -> nn.Module:
    """A CPU copy of ``model`` with every layer in int8, by FX graph-mode post-training quantization
    for the x86 backend: BatchNorm folded into the convolutions, ReLU fused, Linear layers int8.

    With ``models.Normalized`` the normalisation stays a float subtraction and division before the
    first quantize; the output is dequantized to float logits. ``model`` itself is left as it was.

    Args:
        model: a classifier taking images in [0, 1] of shape (N, 3, H, W).
        calibration_images: float (M, 3, H, W) in [0, 1], e.g. a few hundred training images; their
            activations set the quantization ranges.
        batch_size: images per calibration forward pass.
    """
    images = calibration_images.cpu()
    if images.ndim != 4 or not len(images) or not images.is_floating_point() or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"calibration_images must be a non-empty batch of float images (N, C, H, W) in [0, 1], got "
            f"{images.dtype} {tuple(images.shape)}; e.g. pass uint8 images / 255"
        )
    _, qconfig_mapping, prepare_fx, convert_fx = _ao_quantization()
    with _quiet_deprecations():
        try:
            prepared = prepare_fx(_cpu_eval_copy(model), qconfig_mapping("x86"), example_inputs=(images[:1],))
        except (torch.fx.proxy.TraceError, TypeError, NotImplementedError) as err:  # data-dependent control flow
            raise QuantizationError(f"static int8 needs a network torch.fx can trace ({type(err).__name__}: "
                                    f"{(str(err).splitlines() or [''])[0]})") from None
        for batch in images.split(batch_size):
            prepared(batch)
        return convert_fx(prepared)


class _RoundStraightThrough(torch.autograd.Function):
    """Forward: round to the nearest integer (half to even, as the int8 kernels). Backward: identity."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.round()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        return grad_output


def fake_quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | int, quant_max: int = 255) -> Tensor:
    """``x`` quantized to unsigned integers in [0, quant_max] and back to float, as an int8 layer
    sees it; the gradient passes straight through the rounding (and is zero where clamped)."""
    levels = (_RoundStraightThrough.apply(x / scale) + zero_point).clamp(0, quant_max)
    return (levels - zero_point) * scale


def _fake_quantize_node(x: Tensor, scale: Tensor, zero_point: Tensor, dtype: torch.dtype) -> Tensor:
    """Stands in for ``torch.quantize_per_tensor`` in a converted graph (quint8 activations)."""
    return fake_quantize(x, scale, zero_point)


def _fake_quantized_add(a: Tensor, b: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Stands in for ``torch.ops.quantized.add`` (a residual connection's int8 sum)."""
    return fake_quantize(a + b, scale, zero_point)


def _fake_quantized_add_relu(a: Tensor, b: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return fake_quantize((a + b).relu(), scale, zero_point)


def _frozen_parameter(tensor: Tensor) -> nn.Parameter:
    # A parameter, not a buffer: an attack library finds the model's device from its parameters
    # (torchattacks prints a warning for a model without any).
    return nn.Parameter(tensor.detach().clone(), requires_grad=False)


class _FakeQuantizedLayer(nn.Module):
    """A float twin of a static int8 Conv2d or Linear layer (ReLU fused or not): its dequantized
    weights, its float bias, and its output fake-quantized with its own scale and zero point."""

    def __init__(self, layer: nn.Module, relu: bool) -> None:
        super().__init__()
        self.layer, self.relu = layer, relu
        self.weight, self.bias = _frozen_parameter(layer.weight().dequantize()), _frozen_parameter(layer.bias())
        self.scale, self.zero_point = float(layer.scale), int(layer.zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.ndim == 4:
            layer = self.layer
            x = nn.functional.conv2d(x, self.weight, self.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            x = nn.functional.linear(x, self.weight, self.bias)
        return fake_quantize(x.relu() if self.relu else x, self.scale, self.zero_point)


class _FakeDynamicLinear(nn.Module):
    """A float twin of a dynamic int8 Linear layer: its input fake-quantized per call with the range
    of the whole input (7-bit, ``reduce_range`` as the x86 kernel does), its dequantized weights."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = _frozen_parameter(layer.weight().dequantize()), _frozen_parameter(layer.bias())

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            low, high = x.min().clamp(max=0), x.max().clamp(min=0)
            scale = ((high - low) / 127).clamp(min=1e-8)
            zero_point = (-low / scale).round().clamp(0, 127)
        return nn.functional.linear(fake_quantize(x, scale, zero_point, quant_max=127), self.weight, self.bias)


def fake_quant_surrogate(quantized: nn.Module) -> nn.Module:
    """A differentiable float copy of an int8 model from :func:`quantize_dynamic_linear` or
    :func:`quantize_static` (Lin, Gan & Han 2019 attack quantized models this way): every int8
    layer replaced by its float twin holding the int8 model's own weights, scales and zero points,
    rounding with a straight-through gradient. A gradient attack on it is a white-box attack on
    the int8 model; its predictions agree with the int8 model's on nearly every image.
    """
    import torch.ao.nn.intrinsic.quantized as fused
    import torch.ao.nn.quantized as quantized_nn
    from torch.ao.nn.quantized import dynamic

    twins = {fused.ConvReLU2d: lambda m: _FakeQuantizedLayer(m, relu=True),
             fused.LinearReLU: lambda m: _FakeQuantizedLayer(m, relu=True),
             quantized_nn.Conv2d: lambda m: _FakeQuantizedLayer(m, relu=False),
             quantized_nn.Linear: lambda m: _FakeQuantizedLayer(m, relu=False),
             dynamic.Linear: _FakeDynamicLinear}
    with torch.inference_mode(False):  # tensors autograd can use, even from a model made under inference mode
        surrogate = copy.deepcopy(quantized).requires_grad_(False)
        for name, module in list(surrogate.named_modules()):
            if type(module) in twins:
                surrogate.set_submodule(name, twins[type(module)](module))
    if isinstance(surrogate, torch.fx.GraphModule):
        float_twins = {torch.quantize_per_tensor: _fake_quantize_node, torch.ops.quantized.add: _fake_quantized_add,
                       torch.ops.quantized.add_relu: _fake_quantized_add_relu}
        for node in list(surrogate.graph.nodes):
            if node.op == "call_function" and node.target in float_twins:
                node.target = float_twins[node.target]
            elif node.op == "call_method" and node.target == "dequantize":  # no gradient; the tensor is float now
                node.replace_all_uses_with(node.args[0])
                surrogate.graph.erase_node(node)
        surrogate.recompile()
    return surrogate.eval()


def state_dict_megabytes(model: nn.Module) -> float:
    """Size of ``torch.save(model.state_dict())`` in MB (10^6 bytes); quantized layers count their
    packed int8 weights."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


@torch.inference_mode()
def cpu_latency(
    model: nn.Module, batch_size: int = 128, warmup: int = 3, repeats: int = 10, threads: int | None = None
) -> dict[str, float]:
    """Median CPU forward time of ``model`` on one random [0, 1] batch (batch_size, 3, 32, 32).

    The batch is channels_last for every model: measured on ImprovedCNN it is as fast as or faster
    than NCHW for each kind: FP32 (the training format; 20% faster if the weights are not already
    channels_last), dynamic int8 (its convolutions are FP32; equal) and static int8 (~3% faster).

    Args:
        model: a CPU model in eval mode taking images in [0, 1].
        batch_size: images per forward pass.
        warmup: untimed passes first.
        repeats: timed passes; the median is reported.
        threads: torch intra-op threads for the measurement, restored afterwards; None keeps the
            current setting.

    Returns:
        ``ms_per_batch`` (median), ``images_per_s``, ``threads`` (used), ``batch_size``.
    """
    if model.training:
        raise ValueError("cpu_latency measures inference: pass a model in eval mode (model.eval())")
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    # A private generator, so measuring does not move the global random stream.
    images = torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        for _ in range(warmup):
            model(images)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    median = statistics.median(seconds)
    return {"ms_per_batch": 1000 * median, "images_per_s": batch_size / median, "threads": used_threads,
            "batch_size": batch_size}
