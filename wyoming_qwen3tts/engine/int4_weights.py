"""4-bit weights: PyTorch's int4 kernel, and Arm's KleidiAI kernels where the CPU can run them.

* `Int4Weights`: `torch._weight_int4pack_mm_for_cpu` (weight-only, groups of 32 with scale and
  zero, bfloat16 activations). On our x86 CPUs it is not faster than int8 and saves memory only
  (BENCHMARKS.md, "kernel probe").
* `KleidiAIInt4Weights`, on a 64-bit Arm CPU with the Armv8.2 dot product (a Raspberry Pi 5):
  Arm's KleidiAI kernels behind `torch._dyn_quant_matmul_4bit` (symmetric groups of 32, each
  activation row quantized to 8 bits inside the kernel), which PyTorch builds into its aarch64
  wheels only. On x86 the same operator is PyTorch's reference code, more than 10x slower than
  `Int4Weights` (kernel probe), so it is offered only where KleidiAI is built in. Chosen by
  design, not by a measurement of ours: no Arm machine has run it for us but an emulated one
  (`script/arm64-check`).
"""

from __future__ import annotations

import ctypes
import platform

import torch

INT4_GROUP = 32


def weight_groups(weight: torch.Tensor, group: int) -> torch.Tensor:
    """``weight`` [out, in] in float32 as [out, in / group, group]; ValueError where ``group`` does not divide its inputs."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"{in_features} inputs are not a multiple of the int4 group ({group})")
    return weight.detach().to(torch.float32).reshape(out_features, in_features // group, group)


class Int4Weights:
    """A weight matrix as 4-bit groups with a scale and a zero each, packed for the CPU kernel."""

    bits = 4
    min_snr_db = 15.0  # `kernel_fault`'s bound; groups of 32 give about 22 dB on random layers

    @classmethod
    def kernel(cls) -> str:
        return f"torch _weight_int4pack_mm_for_cpu (weight-only, groups of {INT4_GROUP})"

    @classmethod
    def cannot_run(cls) -> str | None:
        """None: PyTorch builds this kernel for every CPU (whether its products are right is `kernel_fault`'s question)."""
        return None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int = INT4_GROUP) -> None:
        groups = weight_groups(weight, group)
        out_features, in_features = weight.shape
        self.group = group
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low) / scales).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        # The kernel computes (code - 8) * scale + zero.
        zeros = low + 8 * scales
        self.scales_and_zeros = (
            torch.stack((scales.squeeze(-1), zeros.squeeze(-1)), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        )
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        # float32, as int8 keeps it: a bfloat16 bias loaded as stored is a view of the file, whose
        # whole mapping it would keep (`stored_precision.py`).
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self.out_features, self.in_features = out_features, in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # A bfloat16 input is not copied by the conversion, and the kernel refuses a strided view
        # (the last position of each row of a batch).
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features // 2 + 4 * self.out_features * (self.in_features // self.group)


# getauxval(AT_HWCAP) on 64-bit Arm Linux: bit 20 is the Armv8.2 8-bit dot product (asimddp).
_AT_HWCAP, _HWCAP_ASIMDDP = 16, 1 << 20


def arm_dot_product() -> bool:
    """Whether this is a 64-bit Arm CPU with the 8-bit dot product instructions (Armv8.2; a
    Raspberry Pi 5's Cortex-A76 has them, a Pi 4's Cortex-A72 does not)."""
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return False
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):  # not glibc or musl on Linux
        return False
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, (ctypes.c_ulong,)
    return bool(getauxval(_AT_HWCAP) & _HWCAP_ASIMDDP)


def kleidiai_built() -> bool:
    """Whether this PyTorch has Arm's KleidiAI kernels (its aarch64 builds)."""
    kleidiai = getattr(torch.backends, "kleidiai", None)
    return kleidiai is not None and kleidiai.is_available()


class KleidiAIInt4Weights:
    """A weight matrix as symmetric 4-bit groups with a bfloat16 scale each, packed for Arm's
    KleidiAI kernels (`torch._dyn_quant_matmul_4bit`): the kernel quantizes each input row to
    8 bits with a scale and zero point of its own and runs 8-bit dot products over the 4-bit
    weights. A row's integer products do not depend on the rows beside it; on a CPU with the
    i8mm instructions PyTorch takes another kernel for several rows than for one, whose float
    sums may round differently (not checked: no such CPU, emulated or real, has run it for us)."""

    bits = 4
    min_snr_db = 15.0  # `kernel_fault`'s bound; symmetric groups of 32 give about 20 dB on random layers

    @classmethod
    def kernel(cls) -> str:
        return f"KleidiAI int4 (torch _dyn_quant_matmul_4bit: symmetric groups of {INT4_GROUP}, 8-bit activations per row)"

    @classmethod
    def cannot_run(cls) -> str | None:
        """Why this machine cannot run the kernel, or None. PyTorch takes KleidiAI's one-row kernel
        without asking the CPU, and an instruction the CPU lacks kills the process: this must be
        asked before any call."""
        if not kleidiai_built():
            return "this PyTorch has no KleidiAI kernels (only its aarch64 builds do)"
        if not arm_dot_product():
            return "this CPU lacks the Armv8.2 dot product instructions that KleidiAI's kernels need"
        return None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int = INT4_GROUP) -> None:
        groups = weight_groups(weight, group)
        out_features, in_features = weight.shape
        scales = (groups.abs().amax(-1) / 7).clamp(min=1e-12)
        # Stored as code + 8, two to a byte, the even column in the low nibble.
        codes = (torch.round(groups / scales.unsqueeze(-1)).clamp(-8, 7) + 8).to(torch.uint8).reshape(out_features, in_features)
        nibbles = (codes[:, 1::2] << 4 | codes[:, 0::2]).contiguous()
        # bfloat16 scales: with float32 ones PyTorch takes KleidiAI's kernels for whole rows only
        # (one group per row), and groups go to its reference code.
        self.packed = torch.ops.aten._dyn_quant_pack_4bit_weight(
            nibbles, scales.to(torch.bfloat16), None if bias is None else bias.detach().to(torch.float32), group, in_features, out_features
        )
        self.group = group
        self.out_features, self.in_features = out_features, in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32:
            rows = rows.float()
        out = torch.ops.aten._dyn_quant_matmul_4bit(rows.contiguous(), self.packed, self.group, self.in_features, self.out_features)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()


def int4_kernels() -> tuple[type[KleidiAIInt4Weights] | type[Int4Weights], ...]:
    """The int4 kernels to try on this machine, best first: KleidiAI where PyTorch has it (on x86
    its operator is slow reference code), then PyTorch's int4 kernel."""
    return (KleidiAIInt4Weights, Int4Weights) if kleidiai_built() else (Int4Weights,)
