"""The package's decoder layers as plain tensor functions over the package's own parameters.

Calling the package's layer modules costs keyword plumbing, the transformers attention registry
and a `Cache` object on every call; on a one-token step of a small model (and on any GPU) that
overhead outweighs the arithmetic. These functions do the same arithmetic in the same order on
the same parameter tensors (nothing is copied but the q and k norm weights, joined into one small
table), so on CPU they give the modules' results bit for bit (tested), and they are plain enough
for `torch.compile` to fuse and for CUDA graphs to capture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quantized_linear import Linear, linear_of, projections_of

# Several projections of one input: x -> (y1, y2, ...), in one call where the weights allow.
Projections = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class LayerWeights:
    """One Qwen3 decoder layer: attention with per-head q/k norms, then a SwiGLU MLP."""

    input_norm: torch.Tensor
    qk_v: Projections  # x -> (queries and keys side by side, values)
    o: Linear
    qk_norm: torch.Tensor  # [query heads + key heads, head_dim]: q_norm's weight per query head, then k_norm's
    query_heads: int
    post_norm: torch.Tensor
    gate_up: Projections
    down: Linear

    @classmethod
    def of(cls, layer, query_heads: int, key_heads: int) -> "LayerWeights":
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            input_norm=layer.input_layernorm.weight,
            qk_v=projections_of((attn.q_proj, attn.k_proj, attn.v_proj), parts=(2, 1)),
            o=linear_of(attn.o_proj),
            qk_norm=torch.cat(
                (attn.q_norm.weight.expand(query_heads, -1), attn.k_norm.weight.expand(key_heads, -1))
            ).detach(),
            query_heads=query_heads,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=projections_of((mlp.gate_proj, mlp.up_proj)),
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
            layers=tuple(
                LayerWeights.of(layer, config.num_attention_heads, config.num_key_value_heads) for layer in model.layers
            ),
            norm=model.norm.weight,
            eps=config.rms_norm_eps,
            head_dim=head_dim,
            scaling=head_dim**-0.5,
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """Run ``hidden`` [B, n, D] (B rows of n new positions) through every layer and the final norm.

        ``cos``/``sin`` are the rotary tables of the new positions, [B or 1, 1, n, head_dim], ``sin``
        with its first half negated (`signed_sin`). ``cache``
        (`kv_cache.py`) keeps each row's keys and values: `attend(layer, q, k, v, scaling)` and
        `advance(n)`.
        """
        for index, layer in enumerate(self.layers):
            hidden = self._layer(layer, index, hidden, cos, sin, cache)
        cache.advance(hidden.shape[1])
        return rms_norm(hidden, self.norm, self.eps)

    def _layer(self, w: LayerWeights, index: int, hidden, cos, sin, cache) -> torch.Tensor:
        batch, length, _ = hidden.shape
        heads_shape = (batch, length, -1, self.head_dim)
        x = rms_norm(hidden, w.input_norm, self.eps)
        qk, v = w.qk_v(x)
        # Queries and keys get the same per-head norm and rotation: one pass over both heads'
        # values instead of two (each element's arithmetic is the package's).
        qk = rms_norm(qk.reshape(heads_shape), w.qk_norm, self.eps).transpose(1, 2)
        # The package's x * cos + rotate_half(x) * sin, where rotate_half(x) is the halves of x
        # swapped, the first negated: negating sin's first half instead gives the same products.
        qk = qk * cos + qk.roll(self.head_dim // 2, dims=-1) * sin
        q, k = qk[:, : w.query_heads], qk[:, w.query_heads :]
        v = v.reshape(heads_shape).transpose(1, 2)
        attended = cache.attend(index, q, k, v, self.scaling)
        attended = attended.transpose(1, 2).contiguous().reshape(batch, length, -1).contiguous()
        hidden = hidden + w.o(attended)
        x = rms_norm(hidden, w.post_norm, self.eps)
        gate, up = w.gate_up(x)
        return hidden + w.down(F.silu(gate) * up)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The package's RMSNorm: statistics in float32, scaled in the input dtype.

    ``weight`` is one vector, or a table with one per head (``hidden`` [..., heads, head_dim]).
    """
    dtype = hidden.dtype
    if dtype == torch.float32 and hidden.device.type == "cpu":
        # PyTorch's own norm runs the same kernels in the same order on a CPU (the same numbers,
        # tested), as one call instead of eight: 6-7 us less per norm, 325 norms a frame.
        # Elsewhere it may be one fused kernel that sums in another order.
        if weight.dim() == 1:
            return torch.rms_norm(hidden, weight.shape, weight, eps)
        return weight * torch.rms_norm(hidden, weight.shape[-1:], None, eps)
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """A rotary sine table as `DecoderStack.forward` takes it: its first half negated."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
