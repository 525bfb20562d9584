"""8-bit and 4-bit weights for the talker and the code predictor, chosen at load time.

A frame on a CPU is bound by reading weights: fewer bytes per weight, and a kernel that reads
them fast, is what makes it quicker. Every `nn.Linear` of the talker and of the code predictor
(attention projections, MLPs, the codec head, the 15 predictor heads, the text projection) is
replaced by a `QuantizedLinear`; embeddings, norms and the codec decoder stay as they are
(quantizing the codec's Snake activations makes noise). The kernels are PyTorch's own, measured
on our CPU (BENCHMARKS.md, "kernel probe"):

* int8: fbgemm's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`): per-output-channel
  weight scales, and the activation quantized on the fly. fbgemm scales a whole input at once,
  so it gets one row at a time (an input of several rows, a prompt, goes row by row), and every
  row has a scale of its own.
  torchao's int8 configurations were 25-35x slower than this on our AVX2 CPU (no fast kernel
  there without compiling), so torchao is not used.
* int4: `torch._weight_int4pack_mm_for_cpu` (weight-only, groups of 32 with scale and zero,
  bfloat16 activations). On our CPU it is slower than int8 and saves memory only.

Where a kernel is missing (another CPU, a GPU), the next one down is used, with one log line.
"""

from __future__ import annotations

import ctypes
import logging
import warnings

import torch
import torch.nn.functional as F

_LOGGER = logging.getLogger(__name__)

INT4_GROUP = 32
# Best first; a mode falls back along this order.
MODES = ("int4", "int8", "none")


class Int8Weights:
    """A weight matrix as fbgemm's packed int8, with per-output-channel scales."""

    kernel = "fbgemm dynamic int8 (per-channel weights, per-row activations)"
    bits = 8

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.detach().to(torch.float32)
        self.scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch.ao's deprecation notice; these are core kernels
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, self.scales.double(), zero_points, 0, torch.qint8)
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self.packed = torch.ops.quantized.linear_prepack(quantized, self.bias)
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if rows.shape[0] == 1:
            out = torch.ops.quantized.linear_dynamic(rows, self.packed, True)
        else:
            out = torch.cat([torch.ops.quantized.linear_dynamic(row, self.packed, True) for row in rows.split(1)])
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features + 4 * self.out_features


class Int4Weights:
    """A weight matrix as 4-bit groups with a scale and a zero each, packed for the CPU kernel."""

    kernel = f"torch _weight_int4pack_mm_for_cpu (weight-only, groups of {INT4_GROUP})"
    bits = 4

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.detach().to(torch.float32)
        out_features, in_features = weight.shape
        if in_features % INT4_GROUP:
            raise ValueError(f"{in_features} inputs are not a multiple of the int4 group ({INT4_GROUP})")
        groups = weight.reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low) / scales).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        # The kernel computes (code - 8) * scale + zero.
        zeros = low + 8 * scales
        self.scales_and_zeros = (
            torch.stack((scales.squeeze(-1), zeros.squeeze(-1)), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        )
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = out_features, in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features // 2 + 4 * self.out_features * (self.in_features // INT4_GROUP)


KERNELS = {"int8": Int8Weights, "int4": Int4Weights}


class QuantizedLinear(torch.nn.Module):
    """An `nn.Linear` replacement over quantized weights; the package's modules call it as before."""

    def __init__(self, weights: Int8Weights | Int4Weights) -> None:
        super().__init__()
        self.weights = weights
        self.in_features, self.out_features = weights.in_features, weights.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x)


def linear_of(module: torch.nn.Module):
    """A linear layer as a plain callable ``x -> y``: the quantized kernel, or `F.linear` on its weights."""
    if isinstance(module, QuantizedLinear):
        return module.weights
    weight, bias = module.weight, module.bias
    return lambda x: F.linear(x, weight, bias)


def resolve_mode(requested: str, device: torch.device) -> str:
    """The mode to use: `auto` is int8 on a CPU and none elsewhere; a missing kernel falls back."""
    mode = ("int8" if device.type == "cpu" else "none") if requested == "auto" else requested
    if mode == "none":
        return mode
    if device.type != "cpu":
        _LOGGER.warning("Quantized weights (%s) need the CPU kernels; on %s the model keeps its weights as they are", mode, device)
        return "none"
    for candidate in MODES[MODES.index(mode) :]:
        if candidate == "none":
            break
        try:
            probe = KERNELS[candidate](torch.randn(64, 128), torch.zeros(64))
            probe(torch.randn(1, 128))
            probe(torch.randn(3, 128))
        except Exception as err:  # noqa: BLE001 - no such kernel on this machine
            _LOGGER.warning("No %s kernel on this machine (%s: %s); trying the next one", candidate, type(err).__name__, err)
            continue
        if candidate != mode:
            _LOGGER.warning("Using %s weights instead of %s", candidate, mode)
        return candidate
    _LOGGER.warning("No quantized kernel works here: the model keeps its weights as they are")
    return "none"


def release_freed_memory() -> None:
    """Hand the float weights' freed pages back to the system (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by the process anyway
        pass


def quantize_talker(model: torch.nn.Module, mode: str) -> None:
    """Replace every linear layer of ``model.talker`` (code predictor included) in place."""
    if mode == "none":
        return
    kernel = KERNELS[mode]
    layers = float_bytes = quantized_bytes = 0
    with torch.no_grad():
        for parent in list(model.talker.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                try:
                    weights = kernel(child.weight, child.bias)
                except ValueError:  # a shape the int4 groups do not divide (tiny test models): 8 bits
                    weights = Int8Weights(child.weight, child.bias)
                setattr(parent, name, QuantizedLinear(weights))
                layers += 1
                float_bytes += child.weight.numel() * child.weight.element_size()
                quantized_bytes += weights.nbytes
    release_freed_memory()
    _LOGGER.info(
        "Quantized %d linear layers to %s with %s: %.0f MiB of weights instead of %.0f MiB",
        layers,
        mode,
        kernel.kernel,
        quantized_bytes / 2**20,
        float_bytes / 2**20,
    )
