"""The package's decoder layers as plain tensor functions over the package's own parameters.

Calling the package's layer modules costs keyword plumbing, the transformers attention registry
and a `Cache` object on every call; on a one-token step of a small model (and on any GPU) that
overhead outweighs the arithmetic. These functions do the same arithmetic in the same order on
the same parameter tensors (nothing is copied), so on CPU they give the modules' results bit for
bit (tested), and they are plain enough for `torch.compile` to fuse and for CUDA graphs to capture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quantize import linear_of

# A linear layer as a callable x -> y: float weights through F.linear, or a quantized kernel.
Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerWeights:
    """One Qwen3 decoder layer: attention with per-head q/k norms, then a SwiGLU MLP."""

    input_norm: torch.Tensor
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_norm: torch.Tensor
    gate: Linear
    up: Linear
    down: Linear

    @classmethod
    def of(cls, layer) -> "LayerWeights":
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            input_norm=layer.input_layernorm.weight,
            q=linear_of(attn.q_proj),
            k=linear_of(attn.k_proj),
            v=linear_of(attn.v_proj),
            o=linear_of(attn.o_proj),
            q_norm=attn.q_norm.weight,
            k_norm=attn.k_norm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            gate=linear_of(mlp.gate_proj),
            up=linear_of(mlp.up_proj),
            down=linear_of(mlp.down_proj),
        )


@dataclass(frozen=True)
class DecoderStack:
    """A stack of decoder layers and its final norm, as the package built them."""

    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor
    eps: float
    head_dim: int
    scaling: float

    @classmethod
    def of(cls, model, config) -> "DecoderStack":
        """From a package model with `.layers` and `.norm` (the talker's or the code predictor's)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}")
        return cls(
            layers=tuple(LayerWeights.of(layer) for layer in model.layers),
            norm=model.norm.weight,
            eps=config.rms_norm_eps,
            head_dim=head_dim,
            scaling=head_dim**-0.5,
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """Run ``hidden`` [1, n, D] through every layer and the final norm.

        ``cos``/``sin`` are the rotary tables of the n new positions, [1, 1, n, head_dim]. ``cache``
        has `update(keys, values, layer) -> (all keys, all values)` and `advance(n)`.
        """
        for index, layer in enumerate(self.layers):
            hidden = self._layer(layer, index, hidden, cos, sin, cache)
        cache.advance(hidden.shape[1])
        return rms_norm(hidden, self.norm, self.eps)

    def _layer(self, w: LayerWeights, index: int, hidden, cos, sin, cache) -> torch.Tensor:
        batch, length, _ = hidden.shape
        heads_shape = (batch, length, -1, self.head_dim)
        x = rms_norm(hidden, w.input_norm, self.eps)
        q = rms_norm(w.q(x).view(heads_shape), w.q_norm, self.eps).transpose(1, 2)
        k = rms_norm(w.k(x).view(heads_shape), w.k_norm, self.eps).transpose(1, 2)
        v = w.v(x).view(heads_shape).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = cache.update(k, v, index)
        # What transformers' sdpa integration passes: causal only for several new positions.
        attended = F.scaled_dot_product_attention(
            q, keys, values, is_causal=length > 1, scale=self.scaling, enable_gqa=True
        )
        attended = attended.transpose(1, 2).contiguous().reshape(batch, length, -1).contiguous()
        hidden = hidden + w.o(attended)
        x = rms_norm(hidden, w.post_norm, self.eps)
        return hidden + w.down(F.silu(w.gate(x)) * w.up(x))


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The package's RMSNorm: statistics in float32, scaled in the input dtype."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GrowingKVCache:
    """Keys and values that grow by concatenation: for the code predictor's 16 positions.

    Each step's shapes are fixed by its index, so a compiled frame loop sees static shapes.
    """

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int):
        if self.keys[layer] is not None:
            keys = torch.cat((self.keys[layer], keys), dim=2)
            values = torch.cat((self.values[layer], values), dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    def advance(self, steps: int) -> None:
        self.length += steps
