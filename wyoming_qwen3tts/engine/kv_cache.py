"""Key/value caches for our decoder layers; each cache also decides how its rows attend.

* `StaticKVCache`: one utterance's talker history, preallocated and grown rarely; or the code
  predictor's 16 positions of one frame, for any number of rows (every row of a batch is at the
  same position, so one attention call serves them all).
* `RowCaches`: a batch of talker rows, each over its own `StaticKVCache` of its own length.
  The linear layers see the whole batch at once (one read of the weights); attention runs row by
  row over each row's own keys. On a CPU that costs a few microseconds per row and layer, less
  than one padded, masked call (`benchmarks/attention_probe.py`).
* `KVSlots`, `SlotKVCache`, `PaddedRows`: the talker histories of all utterances in progress as
  slots of one padded tensor, so that a batch writes its keys in one call and attends in one
  masked call per layer, whatever its number of rows. For a GPU, where each operator costs host
  time and most launch a kernel: per row, 16 streams dispatch 224 operators per layer, padded 11.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """What transformers' sdpa integration computes: causal only for several new positions.

    Several new positions after a history (a prompt continuing a cached beginning) see the whole
    history and the new positions up to their own: the causal mask aligned to the last key, where
    ``is_causal`` would align it to the first.
    """
    new, total = q.shape[2], keys.shape[2]
    if 1 < new < total:
        mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(total - new)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    return F.scaled_dot_product_attention(q, keys, values, is_causal=new > 1, scale=scaling, enable_gqa=True)


class _SharedHistory:
    """A cache whose rows share one history length: add the new keys, then one attention call."""

    def update(self, key_states, value_states, layer_idx):  # pragma: no cover - each cache has its own
        raise NotImplementedError

    def attend(self, layer: int, q, k, v, scaling: float) -> torch.Tensor:
        keys, values = self.update(k, v, layer)
        return attention(q, keys, values, scaling)


class StaticKVCache(_SharedHistory):
    """Preallocated keys and values for a stack of decoder layers: one utterance's talker
    history, or the code predictor's positions of one frame for a batch of ``rows`` (all at the
    same position, so that one attention call serves them all).

    `update()` writes the step's keys and values in place and returns views of all positions so
    far, the way a transformers `Cache` does (the package's own layers accept it too). Nothing is
    allocated per step unless the capacity must grow. Each step's shapes are fixed by its
    position, so a compiled frame loop sees static shapes.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device, rows: int = 1) -> None:
        shape = (layers, rows, kv_heads, max(capacity, 1), head_dim)
        # Uninitialised: only positions written are ever read. Zeroing a real-size talker's cache
        # (127 MB for a sentence) took 12 ms of every prefill, and touched pages never used.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[:3] + (capacity,) + old.shape[4:])
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

    def history(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of the first ``positions``: [layers, 1, kv_heads, n, head_dim]."""
        return self.keys[:, :, :, :positions].clone(), self.values[:, :, :, :positions].clone()

    def start_from(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Begin this (empty) history with ``keys`` and ``values`` as `history` gave them."""
        positions = keys.shape[3]
        if positions > self.capacity:
            self._grow(positions)
        self.keys[:, :, :, :positions] = keys
        self.values[:, :, :, :positions] = values
        self.length = positions

    def release(self) -> None:
        """Nothing to give back: the memory goes with the cache."""


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


class KVSlots:
    """The talker keys and values of every utterance in progress on one model, as slots of one
    padded tensor per kind: [layers, slots, kv_heads, capacity, head_dim].

    An utterance takes a slot at its prefill (`take`) and gives it back when it finishes or is
    dropped. Both dimensions grow when needed (a copy, rarely): slots by half again, capacity by
    doubling. Every slot has the capacity of the longest utterance so far, which a server's
    sentence-sized segments keep to a few hundred positions. Taken and given back from any
    thread; the tensors are only touched by the model's owner thread.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device, slots: int = 2, capacity: int = 256) -> None:
        shape = (layers, slots, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(slots))
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def in_use(self) -> int:
        with self._lock:
            return self.slots - len(self._free)

    def take(self, capacity: int) -> "SlotKVCache":
        """A cache for one new utterance, with room for ``capacity`` positions."""
        with self._lock:
            if not self._free:
                before = self.slots
                self._resize(slots=before + max(1, before // 2))
                self._free.extend(range(before, self.slots))
            # Lowest first: a batch of the utterances in progress is then mostly one run of slots.
            slot = min(self._free)
            self._free.remove(slot)
        self.reserve(capacity)
        # A slot's stale positions are masked out of attention, but a masked NaN (left by a row
        # whose step broke) would still poison the weighted sum: start clean.
        self.keys[:, slot].zero_()
        self.values[:, slot].zero_()
        return SlotKVCache(self, slot)

    def give_back(self, slot: int) -> None:
        with self._lock:
            if slot not in self._free:
                self._free.append(slot)

    def reserve(self, capacity: int) -> None:
        """Make every slot hold at least ``capacity`` positions."""
        if capacity > self.capacity:
            self._resize(capacity=max(capacity, 2 * self.capacity))

    def _resize(self, slots: int | None = None, capacity: int | None = None) -> None:
        slots, capacity = slots or self.slots, capacity or self.capacity
        shape = self.keys.shape[:1] + (slots,) + self.keys.shape[2:3] + (capacity,) + self.keys.shape[4:]
        # Both allocated before either is replaced: out of memory leaves the slots as they were.
        keys, values = self.keys.new_zeros(shape), self.values.new_zeros(shape)
        for new, old in ((keys, self.keys), (values, self.values)):
            new[:, : old.shape[1], :, : old.shape[3]] = old
        self.keys, self.values = keys, values


class SlotKVCache(_SharedHistory):
    """One utterance's talker history in a slot of `KVSlots`: on its own, it attends as a
    `StaticKVCache` does (its slot's positions so far, no mask); in a batch, see `PaddedRows`."""

    def __init__(self, pool: KVSlots, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.length = 0
        # Whoever drops the utterance (a finished, cancelled or failed job) frees its slot.
        self._release = weakref.finalize(self, pool.give_back, slot)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        end = self.length + key_states.shape[-2]
        self.pool.reserve(end)
        keys = self.pool.keys[layer_idx, self.slot : self.slot + 1]
        values = self.pool.values[layer_idx, self.slot : self.slot + 1]
        keys[:, :, self.length : end] = key_states
        values[:, :, self.length : end] = value_states
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def history(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of the first ``positions``: [layers, 1, kv_heads, n, head_dim]."""
        keys = self.pool.keys[:, self.slot : self.slot + 1, :, :positions]
        values = self.pool.values[:, self.slot : self.slot + 1, :, :positions]
        return keys.clone(), values.clone()

    def start_from(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Begin this (empty) history with ``keys`` and ``values`` as `history` gave them."""
        positions = keys.shape[3]
        self.pool.reserve(positions)
        self.pool.keys[:, self.slot : self.slot + 1, :, :positions] = keys
        self.pool.values[:, self.slot : self.slot + 1, :, :positions] = values
        self.length = positions

    def release(self) -> None:
        """Give the slot back now (the utterance is done with it)."""
        self._release()


class PaddedRows:
    """A batch of talker rows in slots of one `KVSlots`, one new position each: per layer, one
    write of all rows' keys and values, then one attention call over the rows' slots, masked to
    each row's own length. Built once per step; its layers all use the same mask."""

    def __init__(self, rows: list[SlotKVCache]) -> None:
        self.rows = rows
        self.pool = rows[0].pool
        lengths = [row.length for row in rows]
        self.end = max(lengths) + 1
        self.pool.reserve(self.end)
        device = self.pool.keys.device
        slots = [row.slot for row in rows]
        self.slots = torch.tensor(slots, device=device)
        self.positions = torch.tensor(lengths, device=device)
        # Slots in one run need no gather: the padded keys are a view of the pool.
        self.run = slice(slots[0], slots[0] + len(slots)) if slots == list(range(slots[0], slots[0] + len(slots))) else None
        self.mask = (torch.arange(self.end, device=device) <= self.positions.unsqueeze(1)).view(len(rows), 1, 1, self.end)

    def attend(self, layer: int, q, k, v, scaling: float) -> torch.Tensor:
        if k.shape[2] != 1:
            raise ValueError("a padded batch takes one new position per row")
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys[self.slots, :, self.positions] = k[:, :, 0]
        values[self.slots, :, self.positions] = v[:, :, 0]
        if self.run is not None:
            keys, values = keys[self.run, :, : self.end], values[self.run, :, : self.end]
        else:
            keys = keys[:, :, : self.end].index_select(0, self.slots)
            values = values[:, :, : self.end].index_select(0, self.slots)
        # One query position: the query heads that share a key/value head are rows of one head's
        # query, which any attention kernel takes with a mask (grouped-query support with a mask
        # varies by kernel and version).
        batch, heads, _, head_dim = q.shape
        grouped = q.reshape(batch, keys.shape[1], heads // keys.shape[1], head_dim)
        attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=self.mask, scale=scaling)
        return attended.reshape(batch, heads, 1, head_dim)

    def advance(self, steps: int) -> None:
        for row in self.rows:
            row.advance(steps)
