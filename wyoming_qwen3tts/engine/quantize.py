"""8-bit and 4-bit weights for the talker and the code predictor, chosen at load time.

A frame on a CPU is bound by reading weights: fewer bytes per weight, and a kernel that reads
them fast, is what makes it quicker. Every `nn.Linear` of the talker and of the code predictor
(attention projections, MLPs, the codec head, the 15 predictor heads, the text projection) is
replaced by a `PreparedLinear` (kernels in `quantized_linear.py` and `int4_weights.py`); a
decoder layer's q, k and v become one matrix, and so do its gate and up, since they read the
same input. Embeddings, norms and the codec decoder stay as they are (quantizing the codec's
Snake activations makes noise).

Where a kernel is missing or gives wrong products (another CPU, a GPU), the next one down is
used, with one log line; for int8 first PyTorch's other quantized engines (on an aarch64 build:
oneDNN, the default, and QNNPACK); for int4 first Arm's KleidiAI kernels where PyTorch has them
(aarch64), then PyTorch's own int4 kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .allocator import release_free_memory
from .int4_weights import Int4Weights, KleidiAIInt4Weights, int4_kernels
from .quantized_linear import Int8Weights, LinearWeights, PreparedLinear, WeightSlice, int8_engine, kernel_fault

_LOGGER = logging.getLogger(__name__)

# Weights prepared for a kernel from a layer's (weight, bias).
PrepareWeights = Callable[[torch.Tensor, torch.Tensor | None], LinearWeights | None]

# Best first; a mode falls back along this order.
MODES = ("int4", "int8", "none")
# Projections of one input that become one matrix: (parent attribute, its linear layers).
FUSED = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def resolve_mode(requested: str, device: torch.device) -> str:
    """The mode to use: `auto` is int8 on a CPU and none elsewhere; a missing or faulty kernel falls back.

    For int8 this also settles PyTorch's quantized engine (`torch.backends.quantized.engine`,
    process-wide): the default when its products are right, else the first other that is.
    """
    mode = ("int8" if device.type == "cpu" else "none") if requested == "auto" else requested
    if mode == "none":
        return mode
    if device.type != "cpu":
        _LOGGER.warning("Quantized weights (%s) need the CPU kernels; on %s the model keeps its weights as they are", mode, device)
        return "none"
    for candidate in MODES[MODES.index(mode) :]:
        if candidate == "none":
            break
        fault = _int8_engine_fault() if candidate == "int8" else _int4_fault()
        if fault is not None:
            _LOGGER.warning("No usable %s kernel on this machine (%s); trying the next one", candidate, fault)
            continue
        if candidate != mode:
            _LOGGER.warning("Using %s weights instead of %s", candidate, mode)
        return candidate
    _LOGGER.warning("No quantized kernel works here: the model keeps its weights as they are")
    return "none"


# Engines to try for int8 when the default one fails, best known first.
INT8_ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")


def _int8_engine_fault() -> str | None:
    """Keep the default quantized engine if its int8 products are right, else switch to one that
    is; what was wrong with the default when none is."""
    default = int8_engine()
    fault = kernel_fault(Int8Weights)
    if fault is None:
        return None
    others = [engine for engine in INT8_ENGINES if engine != default and engine in torch.backends.quantized.supported_engines]
    for engine in others:
        torch.backends.quantized.engine = engine
        if kernel_fault(Int8Weights) is None:
            _LOGGER.warning("PyTorch's quantized engine %r is not usable here (%s); int8 uses %r instead", default, fault, engine)
            return None
    torch.backends.quantized.engine = default
    return f"engine {default!r}: {fault}" + (f"; tried {', '.join(others)} too" if others else "")


def _int4_choice() -> tuple[type[Int4Weights] | type[KleidiAIInt4Weights] | None, list[tuple[type, str]]]:
    """The best int4 kernel usable here (None when none is), and each better one passed over with
    what is wrong with it here."""
    passed_over = []
    for kernel in int4_kernels():
        fault = kernel.cannot_run() or kernel_fault(kernel)
        if fault is None:
            return kernel, passed_over
        passed_over.append((kernel, fault))
    return None, passed_over


def _int4_fault() -> str | None:
    """None when some int4 kernel is usable here (saying in the log why a better one is not), else
    what is wrong with each."""
    kernel, passed_over = _int4_choice()
    if kernel is None:
        return "; ".join(f"{other.kernel()}: {fault}" for other, fault in passed_over)
    for other, fault in passed_over:
        _LOGGER.warning("int4 does not use %s (%s); it uses %s instead", other.kernel(), fault, kernel.kernel())
    return None


def kernel_for(mode: str) -> type[Int8Weights] | type[Int4Weights] | type[KleidiAIInt4Weights]:
    """The kernel that weights of ``mode`` ("int8" or "int4", as `resolve_mode` settled it) use here."""
    if mode == "int8":
        return Int8Weights
    return _int4_choice()[0] or Int4Weights


def _quantized(kernel, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Weights | Int4Weights | KleidiAIInt4Weights:
    try:
        return kernel(weight, bias)
    except ValueError:  # a shape the int4 groups do not divide (tiny test models): 8 bits
        return Int8Weights(weight, bias)


def _fuse(parent: torch.nn.Module, names: tuple[str, ...], prepare: PrepareWeights) -> tuple[int, int] | None:
    """Prepare ``parent``'s linear layers ``names`` as one matrix; the float bytes it replaced and its bytes."""
    layers = [getattr(parent, name, None) for name in names]
    if not all(type(layer) is torch.nn.Linear for layer in layers):
        return None
    weight = torch.cat([layer.weight for layer in layers])
    biases = [layer.bias for layer in layers]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else layer.weight.new_zeros(layer.out_features) for b, layer in zip(biases, layers)]
    )
    fused = prepare(weight, bias)
    if fused is None:
        return None
    start = 0
    for name, layer in zip(names, layers):
        setattr(parent, name, PreparedLinear(WeightSlice(fused, start, start + layer.out_features)))
        start += layer.out_features
    return weight.numel() * layers[0].weight.element_size(), fused.nbytes


def replace_talker_linears(model: torch.nn.Module, prepare: PrepareWeights) -> tuple[int, int, int]:
    """Replace every linear layer of ``model.talker`` (code predictor included) by a `PreparedLinear`
    over ``prepare(weight, bias)`` (None: the layer stays), in place; a layer's q, k and v, and its
    gate and up, as one matrix each. Returns the layers replaced, their float bytes and their new bytes."""
    layers = float_bytes = new_bytes = 0
    # Parents and names only: a list of every module would keep each replaced layer's float
    # weights alive until the end, beside their replacements.
    fused_parents = [
        (parent, names)
        for module in model.talker.modules()
        for attribute, names in FUSED
        if (parent := getattr(module, attribute, None)) is not None
    ]
    with torch.no_grad():
        for parent, names in fused_parents:
            if (sizes := _fuse(parent, names, prepare)) is not None:
                layers += len(names)
                float_bytes += sizes[0]
                new_bytes += sizes[1]
        linear_parents = [
            (parent, name) for parent in model.talker.modules() for name, child in parent.named_children() if type(child) is torch.nn.Linear
        ]
        for parent, name in linear_parents:
            child = getattr(parent, name)
            weights = prepare(child.weight, child.bias)
            if weights is None:
                continue
            setattr(parent, name, PreparedLinear(weights))
            layers += 1
            float_bytes += child.weight.numel() * child.weight.element_size()
            new_bytes += weights.nbytes
    release_free_memory()  # the float weights just replaced: gigabytes the allocator would keep
    return layers, float_bytes, new_bytes


def quantize_talker(model: torch.nn.Module, mode: str) -> None:
    """Replace every linear layer of ``model.talker`` (code predictor included) in place."""
    if mode == "none":
        return
    kernel = kernel_for(mode)
    layers, float_bytes, quantized_bytes = replace_talker_linears(model, lambda weight, bias: _quantized(kernel, weight, bias))
    _LOGGER.info(
        "Quantized %d linear layers to %s with %s: %.0f MiB of weights instead of %.0f MiB",
        layers,
        mode,
        kernel.kernel(),
        quantized_bytes / 2**20,
        float_bytes / 2**20,
    )
