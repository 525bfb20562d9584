"""Linear layers as plain callables x -> y: float weights, or 8-bit and 4-bit kernels.

The kernels are PyTorch's own, measured on our CPU (BENCHMARKS.md, "kernel probe", from
`benchmarks/kernel_probe.py`):

* int8: fbgemm's int8 linear: per-output-channel weight scales, the activation quantized on the
  fly with a scale of its own per row (see `Int8Weights`), so a batch of rows, or a whole prompt,
  takes one call.
  torchao's int8 configurations were 25-35x slower than this on our AVX2 CPU and 8-14x on the
  AVX-512 one (no fast kernel there without compiling), so torchao is not used.
* int4: `int4_weights.py` (PyTorch's int4 kernel; Arm's KleidiAI kernels on an Arm CPU that can
  run them).

Projections that read the same input (a layer's q, k and v; its gate and up) can share one
quantized matrix: one call, and one pass over the input, instead of three or two.

`kernel_fault` checks a kernel's products against the float product before a model relies on
it: running is not enough (on an aarch64 build of PyTorch, under emulation, the default oneDNN
engine's int8 product of a single row came out at 3 dB, i.e. noise).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from .int4_weights import Int4Weights, KleidiAIInt4Weights

# Activations mapped onto [-1, 1] quantize to 0..126 around 63: seven bits, so that AVX2's 16-bit
# pairwise sums cannot saturate (what fbgemm's reduce_range is for).
_SPREAD_SCALE, _SPREAD_ZERO = 1.0 / 63.0, 63

# A linear layer as a callable x -> y.
Linear = Callable[[torch.Tensor], torch.Tensor]


class LinearWeights(Protocol):
    """A weight matrix prepared for a kernel (quantized, or float in a packed layout), called as x -> y."""

    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def int8_engine() -> str:
    """PyTorch's quantized engine, whose kernels the int8 weights use: fbgemm's behind "x86"."""
    return torch.backends.quantized.engine


@functools.cache
def explicit_activation_grid(engine: str) -> bool:
    """Whether the int8 ``engine`` (the current one) takes the activation's quantization from the caller."""
    try:
        weight = torch.quantize_per_channel(
            torch.randn(8, 16), torch.full((8,), 0.01, dtype=torch.double), torch.zeros(8, dtype=torch.long), 0, torch.qint8
        )
        packed = torch.ops.quantized.linear_prepack(weight, None)
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.zeros(2, 16), _SPREAD_SCALE, _SPREAD_ZERO, packed)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


class Int8Weights:
    """A weight matrix as fbgemm's packed int8, with per-output-channel scales.

    Each row of the input is divided by its own largest magnitude, which maps it onto [-1, 1],
    and quantized on one fixed grid; the product is multiplied back by that magnitude. So every
    row has a scale of its own, and since the integer product is exact a row's result never
    depends on the rows beside it: a batch of streams gives what each stream gives alone.
    Symmetric, not min-to-max: the activations that reach these layers (after a norm, SiLU
    times a projection, attention) are centred on zero, where both grids are equally fine, and
    a row costs five small operations instead of a dozen. At one row per call, as in a step of the
    code predictor, those operations were a third of each call (a 4096x1024 layer on an Intel
    Xeon VM, one thread: 454 us, of which the kernel 306; 372 us now).
    Engines that cannot take the grid from us (qnnpack) get one anchor row of -1 and +1 beside
    the input, which makes their own choice of grid the same every time.
    """

    bits = 8
    min_snr_db = 25.0  # `kernel_fault`'s bound; this kernel gives 35-40 dB on random layers

    @classmethod
    def kernel(cls) -> str:
        engine = int8_engine()
        name = "fbgemm" if engine in ("x86", "fbgemm") else engine
        return f"{name} int8 (per-channel weights, per-row symmetric activations)"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.detach().to(torch.float32)
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch.ao's deprecation notice; these are core kernels
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.out_features, self.in_features = weight.shape
        self._explicit = explicit_activation_grid(int8_engine())
        # Seven-bit activations where the engine honours the request (fbgemm's AVX2 pairwise sums
        # could saturate); QNNPACK ignores it and prints a warning into the log every start.
        self._reduce_range = int8_engine() != "qnnpack"
        self._anchor = torch.zeros(1, self.in_features)
        self._anchor[0, 0], self._anchor[0, -1] = -1.0, 1.0
        self.handle = next(_HANDLES)
        _INT8_BY_HANDLE[self.handle] = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32:
            rows = rows.float()
        # Dividing by the largest magnitude gives exactly +-1 at most: no clamp needed. abs() then
        # amax() rather than the infinity norm: the same values, and on an AVX2 CPU (one thread) 1.4x
        # faster for one row and 7-10x for a prompt's 42, where the norm's reduction took a fifth
        # of an int8 prefill.
        magnitude = rows.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
        spread = rows / magnitude
        if torch.compiler.is_compiling():
            out = torch.ops.wyoming_qwen3tts.int8_product(spread, self.handle)
        else:
            out = self.product(spread)
        out = out * magnitude if self.bias is None else torch.addcmul(self.bias, out, magnitude)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def product(self, spread: torch.Tensor) -> torch.Tensor:
        """The integer product of rows already mapped onto [-1, 1], in float32."""
        if self._explicit:
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                spread, _SPREAD_SCALE, _SPREAD_ZERO, self.packed
            )
        return torch.ops.quantized.linear_dynamic(torch.cat((spread, self._anchor)), self.packed, self._reduce_range)[: spread.shape[0]]

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features + 4 * self.out_features


# A compiled graph holds tensors and numbers, not fbgemm's packed weights: it names a layer's
# weights by a number, and the operator below finds them here (weakly: a model's weights go
# when the model goes). Only the compiled code predictor calls it; eager calls go straight in.
_INT8_BY_HANDLE: "weakref.WeakValueDictionary[int, Int8Weights]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("wyoming_qwen3tts::int8_product", mutates_args=())
def _int8_product(spread: torch.Tensor, handle: int) -> torch.Tensor:
    return _INT8_BY_HANDLE[handle].product(spread)


@_int8_product.register_fake
def _(spread: torch.Tensor, handle: int) -> torch.Tensor:
    return spread.new_empty(spread.shape[0], _INT8_BY_HANDLE[handle].out_features)


def kernel_fault(kernel: type[Int8Weights] | type[Int4Weights] | type[KleidiAIInt4Weights]) -> str | None:
    """What is wrong with ``kernel`` on this machine, or None when its products are right.

    A random layer's product must be close to the float product (``kernel.min_snr_db``) for one
    row alone (a stream's every code predictor step) and for the same row among others (a
    batch), and the two must agree: a batch must not change a stream's numbers.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=generator) * 0.05
    bias = torch.randn(128, generator=generator) * 0.01
    rows = torch.randn(4, 256, generator=generator)
    try:
        layer = kernel(weight, bias)
        alone, among = layer(rows[:1]), layer(rows)[:1]
    except Exception as error:  # noqa: BLE001 - any failure means: not usable here
        return f"{type(error).__name__}: {error}"
    expected = F.linear(rows[:1], weight, bias)

    for what, product in (("one row alone", alone), ("a row among others", among)):
        quality = snr_db(expected, product) if torch.isfinite(product).all() else -math.inf
        if not quality >= kernel.min_snr_db:
            return f"its product of {what} is {quality:.1f} dB from the float product (at least {kernel.min_snr_db:.0f} expected)"
    if snr_db(alone, among) < 40.0:
        return "a row's product changes with the rows beside it"
    return None


def snr_db(reference, other) -> float:
    """Signal to difference in dB of ``other`` against ``reference`` (tensors or arrays); inf where equal."""
    reference, other = torch.as_tensor(reference).detach().double(), torch.as_tensor(other).detach().double()
    noise = (other - reference).pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(reference.pow(2).sum() / noise))


class WeightSlice:
    """The outputs ``start:stop`` of a matrix fused from several projections of one input."""

    def __init__(self, fused: LinearWeights, start: int, stop: int) -> None:
        self.fused, self.start, self.stop = fused, start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    @property
    def nbytes(self) -> int:
        """This part's share of the fused matrix."""
        return self.fused.nbytes * self.out_features // self.fused.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Only the package's own modules call a part alone (the stock path); ours call the whole.
        return self.fused(x)[..., self.start : self.stop]


class PreparedLinear(torch.nn.Module):
    """An `nn.Linear` replacement over weights prepared for a kernel (quantized here, or float in
    oneDNN's layout: `packed_weights.py`); the package's modules call it as before."""

    def __init__(self, weights: LinearWeights) -> None:
        super().__init__()
        self.weights = weights
        self.in_features, self.out_features = weights.in_features, weights.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x)


def prepared_bytes(module: torch.nn.Module) -> int:
    """Bytes of the prepared matrices under ``module`` (a fused matrix counts once)."""
    matrices = {}
    for child in module.modules():
        if isinstance(child, PreparedLinear):
            weights = child.weights.fused if isinstance(child.weights, WeightSlice) else child.weights
            matrices[id(weights)] = weights.nbytes
    return sum(matrices.values())


@functools.cache
def onednn_linear(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch has oneDNN's linear for CPU tensors of ``dtype`` on this CPU, and its
    products are right (that a kernel runs is not enough: see `kernel_fault`). For bfloat16 and
    float16 it also says whether this CPU computes in them: oneDNN refuses them where it cannot
    (an AVX2 CPU), and there PyTorch's own product of them is slow too."""
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator).to(dtype) for shape in ((2, 3, 64), (48, 64), (48,)))
    try:
        product = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    expected = F.linear(x.float(), weight.float(), bias.float())
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # a product of 64 terms, rounded to 8 or 11 bits
    return bool(torch.allclose(product.float(), expected, atol=tolerance, rtol=tolerance))


# From this many rows on (a prompt, or a batch of 8 streams) a CPU that cannot compute in bfloat16
# or float16 multiplies in float32 instead. PyTorch's own product of those types there costs the
# same per row whatever the count (a 1024x3072 layer on an AVX2 core: 0.65 ms a row), while
# widening the weights first costs one conversion: at 2 threads it wins from about 6 rows on
# (8 rows: 1.7 against 2.4 ms; 40 rows: 3.0 against 12.1), at 1 thread from 3.
WIDEN_FROM_ROWS = 8


class FloatLinear:
    """Float weights as the package holds them (nothing is copied): on CPUs without AVX-512, on a
    GPU, with `--compile`, and for small layers (on AVX-512 CPUs the rest is `packed_weights.py`'s).

    One stream's rows go through `F.linear`, the package's own kernel, so a stream alone gets the
    package's very numbers. Rows of several streams (a batch: more than one along the first
    dimension) go through oneDNN's linear on a CPU: MKL's product for 2 to 8 rows took up to twice
    as long as for one, oneDNN's reads the weights once for little more (BENCHMARKS.md, "kernel
    probe"). Its results differ from MKL's in rounding only.

    bfloat16 and float16 weights on a CPU without arithmetic in them (oneDNN refuses them there:
    an AVX2 CPU) multiply `WIDEN_FROM_ROWS` rows or more in float32, from a float32 copy of the
    weights made for the call, and round the result once: 40 rows of a 1024x3072 layer took a
    quarter of the time on an AVX2 CPU (2 threads; a fifth on 1).
    Those products differ from the package's in the last bit of some outputs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        onednn = weight.device.type == "cpu" and onednn_linear(weight.dtype)
        self._onednn = onednn and weight.numel() >= 2**18
        self._widen = weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16) and not onednn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn and x.shape[0] > 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self._widen and x.numel() >= WIDEN_FROM_ROWS * x.shape[-1]:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def linear_of(module: torch.nn.Module) -> Linear:
    """A linear layer as a plain callable ``x -> y``: its prepared weights, or `FloatLinear` on its weights."""
    if isinstance(module, PreparedLinear):
        return module.weights
    return FloatLinear(module.weight, module.bias)


def projections_of(
    modules: Sequence[torch.nn.Module], parts: Sequence[int] | None = None
) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Several linear layers of one input as one callable x -> (y1, y2, ...): one call when they
    were prepared as one matrix, else one call each (float weights as the package has them).

    ``parts``: how many consecutive layers' outputs each result joins side by side (default: one
    each). A fused matrix's outputs already lie side by side, so joining them costs nothing.
    """
    parts = tuple(parts) if parts is not None else (1,) * len(modules)
    if sum(parts) != len(modules):
        raise ValueError(f"parts {parts} do not add up to {len(modules)} layers")
    bounds = [0, *itertools.accumulate(parts)]
    prepared = [module.weights if isinstance(module, PreparedLinear) else None for module in modules]
    if all(isinstance(p, WeightSlice) for p in prepared) and len({id(p.fused) for p in prepared}) == 1:
        fused = prepared[0].fused
        offsets = list(itertools.accumulate((p.out_features for p in prepared), initial=0))
        if [p.start for p in prepared] == offsets[:-1]:
            joined = [offsets[stop] - offsets[start] for start, stop in zip(bounds, bounds[1:])]
            return lambda x: fused(x).split(joined, dim=-1)
    linears = [linear_of(module) for module in modules]

    def each(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [linear(x) for linear in linears]
        return tuple(
            outputs[start] if stop - start == 1 else torch.cat(outputs[start:stop], dim=-1)
            for start, stop in zip(bounds, bounds[1:])
        )

    return each
