"""int8 copies of a trained FP32 model, their size and their CPU latency.

Quantized kernels run on the CPU only; every function here returns or measures CPU models.
``torch.ao.quantization`` is deprecated on recent torch (torchao replaces it) but still the one
API that quantizes these layers here; its deprecation warnings, and only those, are silenced.
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

# The exact deprecation warnings torch.ao.quantization raises (torch 2.9 – 2.14).
_DEPRECATIONS = [
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers"),
]


@contextmanager
def quiet_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def _ao_quantization():
    try:
        from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as err:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.ao.quantization ({err}); install a torch that has it, "
            "e.g. pip install 'torch>=2.4,<2.15', or turn QuantizationEvaluation off in the config"
        ) from None
    return quantize_dynamic, get_default_qconfig_mapping, prepare_fx, convert_fx


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().eval()


def quantize_dynamic_linear(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` whose ``nn.Linear`` layers hold qint8 weights and quantize their
    activations on the fly (dynamic quantization); every other layer stays FP32."""
    quantize_dynamic, *_ = _ao_quantization()
    with quiet_deprecations():
        return quantize_dynamic(_cpu_eval_copy(model), {nn.Linear}, dtype=torch.qint8)


@torch.no_grad()
def quantize_static(model: nn.Module, calibration_images: Tensor, batch_size: int = 128) -> nn.Module:
    """A CPU copy of ``model`` with every layer in int8 (convolutions with BatchNorm folded, ReLU
    fused, Linear), by FX graph-mode post-training quantization for the x86 backend; activation
    ranges are calibrated on ``calibration_images`` ([0, 1], (N, 3, H, W), training images)."""
    _, qconfig_mapping, prepare_fx, convert_fx = _ao_quantization()
    with quiet_deprecations():
        prepared = prepare_fx(_cpu_eval_copy(model), qconfig_mapping("x86"), example_inputs=(calibration_images[:1],))
        for batch in calibration_images.split(batch_size):
            prepared(batch)
        return convert_fx(prepared)


def state_dict_megabytes(model: nn.Module) -> float:
    """Size of ``torch.save(model.state_dict())`` in MB (10^6 bytes)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


@torch.inference_mode()
def cpu_latency(model: nn.Module, batch_size: int = 128, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Median CPU forward time of ``model`` on a random [0, 1] batch (batch_size, 3, 32, 32).

    The input is channels_last, as in training: it speeds up the FP32 convolutions (which the
    dynamic int8 model keeps) and costs the static int8 model nothing.
    """
    images = torch.rand(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model = model.eval()
    with quiet_deprecations():
        for _ in range(warmup):
            model(images)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"ms_per_batch": 1000 * median, "images_per_s": batch_size / median, "threads": torch.get_num_threads()}
