"""The codec's widest convolutions as plain matrix products, for the short inputs of a stream.

A streamed chunk is a few frames long, and for inputs that short PyTorch's CPU convolution takes a
naive path (im2col kernels below about 20,000 input elements), or oneDNN, which reorders the
weights on every call: the real codec's first transposed convolution (1536 to 768 channels,
75 MB of weights) took 96 ms for one frame, where reading its weights takes 4, and the
convolution before it (1024 to 1536 channels, kernel 7) 30 ms for a 12-frame chunk. As one
matrix product over the weights as they are stored (with an overlap-add for the transposed
one) they take 9 and 14 ms. Narrow layers with longer inputs stay with oneDNN, which is faster
there; small models keep PyTorch's own call, which costs less Python. Results equal the
convolutions' up to float rounding. Figures: BENCHMARKS.md, "codec kernels and batches"
(`benchmarks/codec_probe.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# PyTorch's CPU convolution uses oneDNN only above this many input elements (batch of one).
SMALL_INPUT = 20480
# Above this, oneDNN's per-call reorder of the weights costs more than the product itself.
LARGE_WEIGHT_BYTES = 32 * 2**20
# Below this many weights the default call is cheaper than the extra Python of ours.
MIN_WEIGHTS = 2**18


class _MatmulKernel:
    def __init__(self, conv: torch.nn.Module) -> None:
        self.conv = conv
        self.default = conv.forward
        self.large = conv.weight.numel() * conv.weight.element_size() >= LARGE_WEIGHT_BYTES

    def _wanted(self, x: torch.Tensor) -> bool:
        return x.dim() == 3 and (self.large or x.shape[1] * x.shape[2] <= SMALL_INPUT)

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
        return self._bias(torch.matmul(windows, self.rows.t()).transpose(1, 2))


class MatmulTransposedConv(_MatmulKernel):
    """A 1-d transposed convolution (no padding) as a matrix product and an overlap-add."""

    def __init__(self, conv: torch.nn.ConvTranspose1d) -> None:
        super().__init__(conv)
        in_channels, out_channels, kernel = conv.weight.shape
        self.columns = conv.weight.view(in_channels, out_channels * kernel)  # no copy
        self.out_channels, self.kernel, self.stride = out_channels, kernel, conv.stride[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._wanted(x):
            return self.default(x)
        batch, _channels, length = x.shape
        products = torch.matmul(x.transpose(1, 2), self.columns)  # [B, T, out * kernel]
        out = F.fold(
            products.transpose(1, 2),
            output_size=(1, (length - 1) * self.stride + self.kernel),
            kernel_size=(1, self.kernel),
            stride=(1, self.stride),
        )
        return self._bias(out.view(batch, self.out_channels, -1))


def use_matmul_kernel(conv: torch.nn.Module) -> None:
    """Give ``conv`` the matrix-product kernel where it applies (the module keeps its weights)."""
    if conv.weight.device.type != "cpu" or conv.weight.numel() < MIN_WEIGHTS or conv.groups != 1 or conv.padding != (0,):
        return
    if type(conv) is torch.nn.Conv1d and conv.stride == (1,):
        conv.forward = MatmulConv(conv)
    elif type(conv) is torch.nn.ConvTranspose1d and conv.output_padding == (0,) and conv.dilation == (1,):
        conv.forward = MatmulTransposedConv(conv)
