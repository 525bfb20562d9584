"""Our decoder layers' arithmetic against the package's modules, number for number."""

from __future__ import annotations

import pytest
import torch

from wyoming_qwen3tts.engine.layers import rms_norm
from wyoming_qwen3tts.engine.quantized_linear import FloatLinear, PreparedLinear, WeightSlice, projections_of
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


def _attention_projections(generator: torch.Generator) -> list[torch.nn.Linear]:
    layers = [torch.nn.Linear(32, size, bias=False) for size in (48, 16, 16)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    return layers


def test_joined_projections_give_each_group_of_outputs_side_by_side():
    """Queries and keys come as one tensor: from a fused matrix without a copy, else joined."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, generator=generator)
    layers = _attention_projections(generator)
    expected = [layer(x).detach() for layer in layers]
    with torch.no_grad():
        qk, v = projections_of(layers, parts=(2, 1))(x)
        assert torch.equal(qk, torch.cat(expected[:2], dim=-1)) and torch.equal(v, expected[2])

        fused = FloatLinear(torch.cat([layer.weight for layer in layers]), None)
        parts, start = [], 0
        for layer in layers:
            parts.append(PreparedLinear(WeightSlice(fused, start, start + layer.out_features)))
            start += layer.out_features
        whole = fused(x)
        qk, v = projections_of(parts, parts=(2, 1))(x)
        assert torch.equal(qk, whole[..., :64]) and torch.equal(v, whole[..., 64:])
        # A view of the fused product, not a copy of its first two parts.
        assert qk.untyped_storage().nbytes() == whole.untyped_storage().nbytes() > qk.numel() * qk.element_size()
        q, k, v = projections_of(parts)(x)
        assert [t.shape[-1] for t in (q, k, v)] == [48, 16, 16]


def test_projection_groups_must_cover_every_layer():
    layers = _attention_projections(torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="do not add up"):
        projections_of(layers, parts=(1, 1))
