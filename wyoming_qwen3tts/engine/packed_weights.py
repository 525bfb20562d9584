"""Float weights in oneDNN's blocked layout, on CPUs with AVX-512.

oneDNN's linear takes plain weights and reorders them into its own blocked layout on every call.
Reordered once, at load, its product reads them as they lie. On a 2-core AMD EPYC (Zen 4,
AVX-512) VM, one thread, a 1024x3072 float32 layer (BENCHMARKS.md, "packed float weights"):
4 rows in the packed layout took 590-630 us, where one row through the package's product (MKL)
took 690-770 and 4 rows through oneDNN with plain weights 1030-1050; 8 rows 850-890 against
1270-1380; a 40-row prompt 2450-2550 against 3000-3250. bfloat16 gains more (oneDNN's bfloat16
reorder is the costlier one): a whole frame step of one stream took 0.55x the time. The packed
matrices replace the float ones; but a model loaded as stored (bfloat16 from a bfloat16 file)
read its weights from the file's pages, and its packed copies are the process's own memory.

Below 4 rows oneDNN takes other kernels for this layout, slower than the package's product and
rounding differently, so a call of 1 to 3 rows is padded with zero rows to 4. From 4 rows on, a
row's product is the same bit for bit whatever rows are beside it (`packing_fault` checks it on
every machine), so a stream gets the same numbers alone and in a batch; they are not the
package's numbers to the last bit (MKL's sums run in another order).

Not used:
* on CPUs without AVX-512: with oneDNN held to AVX2 (`ONEDNN_MAX_CPU_ISA`) on the same VM, the
  layout gained a tenth for batches and lost a third for one row (`FloatLinear` stays);
* with `--compile`, whose compiler multiplies the plain weights its own way;
* for quantized weights (their kernels pack their own) and on a GPU.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .quantize import replace_talker_linears
from .quantized_linear import onednn_linear

_LOGGER = logging.getLogger(__name__)

# Fewer rows take oneDNN's slower kernels for this layout: padded to this many.
MIN_ROWS = 4
# Smaller layers (the tiny test models' all) keep PyTorch's product: its call costs less than the gain.
MIN_WEIGHTS = 2**18


class PackedFloatWeights:
    """A float weight matrix reordered once into oneDNN's blocked layout for its linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = weight.shape
        self._padding = weight.new_zeros(MIN_ROWS, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        count = rows.shape[0]
        if count < MIN_ROWS:
            rows = torch.cat((rows, self._padding[: MIN_ROWS - count]))
        out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.packed, self.bias, "none", [], "")
        if count < MIN_ROWS:
            out = out[:count]
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self._padding.element_size()


@functools.cache
def packing_fault(dtype: torch.dtype) -> str | None:
    """Why float weights of ``dtype`` are not packed on this machine, or None where they are:
    the CPU lacks AVX-512, oneDNN cannot multiply ``dtype`` here, or the packed products are not
    the float product, or a row's product changes with the rows beside it."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"this CPU runs PyTorch's {torch.backends.cpu.get_cpu_capability()} kernels, not AVX-512, where the packed layout is slower for one stream"
    if not onednn_linear(dtype):
        return f"oneDNN has no {str(dtype).removeprefix('torch.')} product on this CPU"
    generator = torch.Generator().manual_seed(0)
    weight, bias, rows = (torch.randn(*shape, generator=generator).to(dtype) for shape in ((96, 64), (96,), (8, 64)))
    try:
        weights = PackedFloatWeights(weight, bias)
        alone, among = weights(rows[:1]), weights(rows)[:1]
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        return f"oneDNN's packed layout fails here ({type(error).__name__}: {error})"
    expected = F.linear(rows[:1].float(), weight.float(), bias.float())
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # a product of 64 terms, rounded to 8 or 11 bits
    if not torch.allclose(alone.float(), expected, atol=tolerance, rtol=tolerance):
        return "oneDNN's products of packed weights are wrong here"
    if not torch.equal(alone, among):
        return "oneDNN's product of a packed row changes with the rows beside it here"
    return None


def pack_float_weights(model: torch.nn.Module) -> None:
    """Replace the talker's and the code predictor's float linear layers (those of at least
    `MIN_WEIGHTS` weights) by their weights in oneDNN's layout, in place."""
    layers, _float_bytes, packed_bytes = replace_talker_linears(
        model, lambda weight, bias: PackedFloatWeights(weight, bias) if weight.numel() >= MIN_WEIGHTS else None
    )
    _LOGGER.info("Float weights of %d linear layers (%.0f MiB) in oneDNN's layout for this AVX-512 CPU", layers, packed_bytes / 2**20)
