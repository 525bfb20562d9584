"""8-bit and 4-bit weights for the talker and the code predictor, chosen at load time.

A frame on a CPU is bound by reading weights: fewer bytes per weight, and a kernel that reads
them fast, is what makes it quicker. Every `nn.Linear` of the talker and of the code predictor
(attention projections, MLPs, the codec head, the 15 predictor heads, the text projection) is
replaced by a `QuantizedLinear` (kernels in `quantized_linear.py`); a decoder layer's q, k and v
become one matrix, and so do its gate and up, since they read the same input. Embeddings, norms
and the codec decoder stay as they are (quantizing the codec's Snake activations makes noise).

Where a kernel is missing (another CPU, a GPU), the next one down is used, with one log line.
"""

from __future__ import annotations

import logging

import torch

from .allocator import release_free_memory
from .quantized_linear import KERNELS, Int4Weights, Int8Weights, QuantizedLinear, WeightSlice

_LOGGER = logging.getLogger(__name__)

# Best first; a mode falls back along this order.
MODES = ("int4", "int8", "none")
# Projections of one input that become one matrix: (parent attribute, its linear layers).
FUSED = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


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


def _quantized(kernel, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Weights | Int4Weights:
    try:
        return kernel(weight, bias)
    except ValueError:  # a shape the int4 groups do not divide (tiny test models): 8 bits
        return Int8Weights(weight, bias)


def _fuse(parent: torch.nn.Module, names: tuple[str, ...], kernel) -> tuple[int, int] | None:
    """Quantize ``parent``'s linear layers ``names`` as one matrix; the float bytes it replaced."""
    layers = [getattr(parent, name, None) for name in names]
    if not all(type(layer) is torch.nn.Linear for layer in layers):
        return None
    weight = torch.cat([layer.weight for layer in layers])
    biases = [layer.bias for layer in layers]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else layer.weight.new_zeros(layer.out_features) for b, layer in zip(biases, layers)]
    )
    fused = _quantized(kernel, weight, bias)
    start = 0
    for name, layer in zip(names, layers):
        setattr(parent, name, QuantizedLinear(WeightSlice(fused, start, start + layer.out_features)))
        start += layer.out_features
    return weight.numel() * layers[0].weight.element_size(), fused.nbytes


def quantize_talker(model: torch.nn.Module, mode: str) -> None:
    """Replace every linear layer of ``model.talker`` (code predictor included) in place."""
    if mode == "none":
        return
    kernel = KERNELS[mode]
    layers = float_bytes = quantized_bytes = 0
    with torch.no_grad():
        for module in list(model.talker.modules()):
            for attribute, names in FUSED:
                parent = getattr(module, attribute, None)
                if parent is not None and (sizes := _fuse(parent, names, kernel)) is not None:
                    layers += len(names)
                    float_bytes += sizes[0]
                    quantized_bytes += sizes[1]
        for parent in list(model.talker.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                weights = _quantized(kernel, child.weight, child.bias)
                setattr(parent, name, QuantizedLinear(weights))
                layers += 1
                float_bytes += child.weight.numel() * child.weight.element_size()
                quantized_bytes += weights.nbytes
    release_free_memory()  # the float weights just replaced: gigabytes the allocator would keep
    _LOGGER.info(
        "Quantized %d linear layers to %s with %s: %.0f MiB of weights instead of %.0f MiB",
        layers,
        mode,
        kernel.kernel,
        quantized_bytes / 2**20,
        float_bytes / 2**20,
    )
