"""Key/value caches for our decoder layers; each cache also decides how its rows attend.

* `StaticKVCache`: one utterance's talker history, preallocated and grown rarely.
* `GrowingKVCache`: the code predictor's 16 positions of one frame, for any number of rows
  (every row of a batch is at the same position, so one attention call serves them all).
* `RowCaches`: a batch of talker rows, each over its own `StaticKVCache` of its own length.
  The linear layers see the whole batch at once (one read of the weights); attention runs row by
  row over each row's own keys. On a CPU that costs a few microseconds per row and layer, less
  than gathering the rows into one padded, masked call (`benchmarks/attention_probe.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """What transformers' sdpa integration computes: causal only for several new positions."""
    return F.scaled_dot_product_attention(
        q, keys, values, is_causal=q.shape[2] > 1, scale=scaling, enable_gqa=True
    )


class _SharedHistory:
    """A cache whose rows share one history length: add the new keys, then one attention call."""

    def update(self, key_states, value_states, layer_idx):  # pragma: no cover - each cache has its own
        raise NotImplementedError

    def attend(self, layer: int, q, k, v, scaling: float) -> torch.Tensor:
        keys, values = self.update(k, v, layer)
        return attention(q, keys, values, scaling)


class StaticKVCache(_SharedHistory):
    """Preallocated keys and values for a stack of decoder layers, batch of one.

    `update()` writes the step's keys and values in place and returns views of all positions so
    far, the way a transformers `Cache` does (the package's own layers accept it too). Nothing is
    allocated per step unless the capacity must grow.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (layers, 1, kv_heads, max(capacity, 1), head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (capacity,) + old.shape[4:])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.keys[layer_idx, :, :, self.length : end] = key_states
        self.values[layer_idx, :, :, self.length : end] = value_states
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps


class GrowingKVCache(_SharedHistory):
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


class RowCaches:
    """One `StaticKVCache` per row of a batch: rows of different lengths attend to their own keys."""

    def __init__(self, rows: list[StaticKVCache]) -> None:
        self.rows = rows

    def attend(self, layer: int, q, k, v, scaling: float) -> torch.Tensor:
        if len(self.rows) == 1:
            return self.rows[0].attend(layer, q, k, v, scaling)
        return torch.cat(
            [row.attend(layer, q[i : i + 1], k[i : i + 1], v[i : i + 1], scaling) for i, row in enumerate(self.rows)]
        )

    def advance(self, steps: int) -> None:
        for row in self.rows:
            row.advance(steps)
