"""Our decoder layers' arithmetic against the package's modules, number for number."""

from __future__ import annotations

import pytest
import torch

from wyoming_qwen3tts.engine.layers import rms_norm
from wyoming_qwen3tts.engine.qwen_import import import_qwen_tts

import_qwen_tts()
from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSRMSNorm  # noqa: E402 - after the import shim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (8, 1, 1024), (1, 42, 1024), (3, 5, 48)])
def test_rms_norm_gives_the_package_norm_bit_for_bit(dtype, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    package = Qwen3TTSRMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        package.weight.copy_(torch.randn(shape[-1], generator=generator))
    package = package.to(dtype)
    for scale in (1e-3, 1.0, 1e3):
        hidden = (torch.randn(*shape, generator=generator) * scale).to(dtype)
        with torch.no_grad():
            assert torch.equal(rms_norm(hidden, package.weight, 1e-6), package(hidden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_a_weight_per_head_gives_each_head_its_package_norm(dtype):
    """The query and key norms of a layer run as one call over both heads' values."""
    generator = torch.Generator().manual_seed(7)
    q_norm, k_norm = Qwen3TTSRMSNorm(128, eps=1e-6), Qwen3TTSRMSNorm(128, eps=1e-6)
    with torch.no_grad():
        q_norm.weight.copy_(torch.randn(128, generator=generator))
        k_norm.weight.copy_(torch.randn(128, generator=generator))
    q_norm, k_norm = q_norm.to(dtype), k_norm.to(dtype)
    q = torch.randn(2, 3, 16, 128, generator=generator).to(dtype)
    k = torch.randn(2, 3, 8, 128, generator=generator).to(dtype)
    weight = torch.cat((q_norm.weight.expand(16, -1), k_norm.weight.expand(8, -1)))
    with torch.no_grad():
        both = rms_norm(torch.cat((q, k), dim=2), weight, 1e-6)
        assert torch.equal(both[:, :, :16], q_norm(q))
        assert torch.equal(both[:, :, 16:], k_norm(k))
