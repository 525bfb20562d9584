"""Faster ways to run the codec decoder's layers on a CPU, for the package's results (bit for bit,
or up to float rounding where a matrix product stands in for a convolution).

* Wide convolutions over short inputs as plain matrix products. A streamed chunk is a few frames
  long, and for inputs that short PyTorch's CPU convolution takes a naive path, or oneDNN, which
  reorders the weights on every call: the real codec's first transposed convolution (1536 to 768
  channels, 75 MB of weights) took 96 ms for one frame, where reading its weights takes 4. As one
  matrix product over the weights (with an overlap-add for the transposed ones) through oneDNN's
  linear, which reads wide weights for a few rows about twice as fast as MKL's product, such
  layers take a fraction of that. Layers over long inputs stay with oneDNN's convolution, which
  is faster there; small layers keep PyTorch's own call, which costs less Python. Results equal
  the convolutions' up to float rounding.
* The ConvNeXt blocks' wide linear layers through the same oneDNN linear.
* The codebooks' divisions made for the looked-up rows only, and SnakeBeta with its per-channel
  factors worked out once and its passes made in place (both bit for bit the package's results).

Figures: BENCHMARKS.md, "codec kernels" (`benchmarks/codec_probe.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quantized_linear import onednn_linear

# Above this, oneDNN's per-call reorder of the weights costs more than the product itself, at any length.
LARGE_WEIGHT_BYTES = 32 * 2**20
# Below this many weights the default call is about as fast as ours, or faster.
MIN_WEIGHTS = 2**20
# A matrix product beats oneDNN's convolution while the input has at most 1/SHORT_INPUT of its
# channels' count in positions (measured on the 384- and 768-channel layers, one thread).
SHORT_INPUT = 3


class _MatmulKernel:
    def __init__(self, conv: torch.nn.Module) -> None:
        self.conv = conv
        self.default = conv.forward
        self.large = conv.weight.numel() * conv.weight.element_size() >= LARGE_WEIGHT_BYTES

    def _wanted(self, x: torch.Tensor) -> bool:
        return x.dim() == 3 and (self.large or x.shape[2] * SHORT_INPUT <= x.shape[1])

    def _bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.conv.bias is None else out + self.conv.bias.unsqueeze(-1)


class MatmulConv(_MatmulKernel):
    """A 1-d convolution (stride 1, no padding) as the product of its windows and its weights."""

    def __init__(self, conv: torch.nn.Conv1d) -> None:
        super().__init__(conv)
        out_channels, in_channels, kernel = conv.weight.shape
        self.rows = conv.weight.view(out_channels, in_channels * kernel)  # no copy
        self.kernel, self.dilation = kernel, conv.dilation[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._wanted(x):
            return self.default(x)
        batch, channels, _length = x.shape
        span = (self.kernel - 1) * self.dilation + 1
        windows = x.unfold(2, span, 1)[..., :: self.dilation]  # [B, C, T, kernel]
        windows = windows.permute(0, 2, 1, 3).reshape(batch, -1, channels * self.kernel)
        return self._bias(product(windows, self.rows).transpose(1, 2))


class MatmulTransposedConv(_MatmulKernel):
    """A 1-d transposed convolution (no padding) as a matrix product and an overlap-add."""

    def __init__(self, conv: torch.nn.ConvTranspose1d) -> None:
        super().__init__(conv)
        in_channels, out_channels, kernel = conv.weight.shape
        self.rows = conv.weight.detach().reshape(in_channels, out_channels * kernel).t().contiguous()
        if self.large:  # the conv keeps a view of the copy: the weights are not held twice
            conv.weight = torch.nn.Parameter(self.rows.t().view(in_channels, out_channels, kernel), requires_grad=False)
        self.out_channels, self.kernel, self.stride = out_channels, kernel, conv.stride[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._wanted(x):
            return self.default(x)
        batch, _channels, length = x.shape
        products = product(x.transpose(1, 2), self.rows)  # [B, T, out * kernel]
        out = F.fold(
            products.transpose(1, 2),
            output_size=(1, (length - 1) * self.stride + self.kernel),
            kernel_size=(1, self.kernel),
            stride=(1, self.stride),
        )
        return self._bias(out.view(batch, self.out_channels, -1))


def product(x: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ rows.T (+ bias)``: oneDNN's linear on a CPU, else PyTorch's."""
    if rows.device.type == "cpu" and onednn_linear():
        return torch.ops.mkldnn._linear_pointwise(x, rows, bias, "none", [], "")
    return F.linear(x, rows, bias)


class WideLinear:
    """A wide linear layer through `product`: MKL's product for 4 to 48 rows took up to twice as long."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return product(x, self.linear.weight, self.linear.bias)


def use_matmul_kernel(layer: torch.nn.Module) -> None:
    """Give a convolution or linear ``layer`` the matrix-product kernel where it applies."""
    if layer.weight.device.type != "cpu" or layer.weight.numel() < MIN_WEIGHTS:
        return
    if type(layer) is torch.nn.Linear:
        layer.forward = WideLinear(layer)
    elif layer.groups != 1 or layer.padding != (0,):
        return
    elif type(layer) is torch.nn.Conv1d and layer.stride == (1,):
        layer.forward = MatmulConv(layer)
    elif type(layer) is torch.nn.ConvTranspose1d and layer.output_padding == (0,) and layer.dilation == (1,):
        layer.forward = MatmulTransposedConv(layer)


class CodebookLookup:
    """A codebook's decode that divides only the rows it looks up: the package divides all 2048
    sums by their usage counts on every call (16 codebooks per chunk), then picks a few. Each
    looked-up value is the same division, so the results are the package's bit for bit."""

    def __init__(self, codebook: torch.nn.Module) -> None:
        self.sums = codebook.embedding_sum
        with torch.no_grad():
            self.usage = codebook.cluster_usage.clamp(min=codebook.epsilon)[:, None]

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.sums) / F.embedding(codes, self.usage)


class Snake:
    """SnakeBeta, ``x + sin(x * e^alpha)^2 / (e^beta + eps)``, with its per-channel factors worked out
    once and all but the first pass made in place: the same operations in the same order (bit for
    bit the package's results), about a quarter faster."""

    def __init__(self, snake: torch.nn.Module) -> None:
        with torch.no_grad():
            self.frequency = snake.alpha.exp()[:, None]
            self.magnitude = 1.0 / (snake.beta.exp() + snake.no_div_by_zero)[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        wave = (x * self.frequency).sin_()
        return wave.mul_(wave).mul_(self.magnitude).add_(x)
