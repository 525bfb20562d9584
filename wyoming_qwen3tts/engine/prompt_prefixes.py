"""The talker's keys and values for the prompt beginnings that many utterances share.

Every prompt in one voice starts with the same embeddings: the role tokens, the codec's think
and language tags and the speaker (or a clone's speaker embedding), an instruction if any, and
for an in-context clone its sample's transcript. The talker is causal and these sit at
positions 0..n-1, so their keys and values depend on nothing that follows. The first prefill in
a voice keeps a copy; later prefills in it start from that copy and compute only their own
text. That is a fifth to a quarter of a preset speaker's sentence prefill, and most of a
streamed reply's first one, whose prompt is the beginning and one word (BENCHMARKS.md, "prompt
beginnings").

Entries are found by their embeddings' content (a hash, then an exact comparison), so another
voice, language, instruction or model is never served a history that is not its own. Beyond a
memory budget the least recently used go.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

# Real-size 0.6B in float32: 229 KB per position, so about 30 preset beginnings (9 positions) or
# five in-context clones with 50-token transcripts.
DEFAULT_BUDGET_BYTES = 64 * 2**20

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptPrefix:
    """A prompt beginning and the talker's history for it."""

    embeds: torch.Tensor  # [1, n, hidden]
    keys: torch.Tensor  # [layers, 1, kv_heads, n, head_dim]
    values: torch.Tensor

    @property
    def positions(self) -> int:
        return self.embeds.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, self.keys, self.values))


def _content_key(embeds: torch.Tensor) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(embeds.shape)} {embeds.dtype}".encode())
    digest.update(embeds.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    return digest.digest()


class PromptPrefixCache:
    """Talker histories of prompt beginnings, by content. One owner thread (the model's)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, PromptPrefix] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, embeds: torch.Tensor) -> PromptPrefix | None:
        """The kept history of exactly these beginning embeddings ([1, n, hidden]), if any."""
        if self.budget_bytes <= 0 or embeds.shape[1] == 0:
            return None
        key = _content_key(embeds)
        entry = self._entries.get(key)
        if entry is None or not torch.equal(entry.embeds, embeds):
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def keep(self, embeds: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Remember the history (keys and values of positions 0..n-1) of beginning ``embeds``."""
        entry = PromptPrefix(embeds.detach().clone(), keys, values)
        if entry.positions == 0 or entry.nbytes > self.budget_bytes:
            return
        key = _content_key(embeds)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while self.nbytes > self.budget_bytes:
            self._entries.popitem(last=False)
        _LOGGER.debug(
            "Kept a voice's prompt beginning (%d positions, %.1f MiB); %d kept, %.1f MiB",
            entry.positions,
            entry.nbytes / 2**20,
            len(self._entries),
            self.nbytes / 2**20,
        )

    def clear(self) -> None:
        self._entries.clear()
