"""Text that arrives while its speech is being generated (dual-track streaming).

Pieces of text come in from the event loop; the model thread turns them into tokens. A token is
only committed once no later text can change it: the tokenizer's pre-tokenizer splits text into
words, punctuation and spaces first, and only the last such piece can still grow ("Hel" may
become "Hello", a trailing space joins the next word). So the committed tokens are always a
prefix of the tokenization of the whole text, whatever the chunking.
"""

from __future__ import annotations

import threading
import unicodedata


class TextFeed:
    """One segment's text, appended by one thread and read by another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: list[str] = []
        self._finished = False

    def append(self, piece: str) -> None:
        with self._lock:
            if self._finished:
                raise RuntimeError("text appended after the segment was finished")
            self._pieces.append(piece)

    def finish(self) -> None:
        with self._lock:
            self._finished = True

    def take(self) -> tuple[str, bool]:
        """Text appended since the last call, and whether the segment is finished."""
        with self._lock:
            text = "".join(self._pieces)
            self._pieces.clear()
            return text, self._finished

    @property
    def has_news(self) -> bool:
        """New text or the end is waiting to be taken."""
        with self._lock:
            return bool(self._pieces) or self._finished


class IncrementalTokenizer:
    """Commits the tokens of a growing text as soon as they are final."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
        self.text = ""
        self.committed: list[int] = []

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoding["input_ids"], encoding["offset_mapping"]

    def push(self, piece: str, finished: bool = False) -> list[int]:
        """Add text; return the tokens that became final (all of them once ``finished``)."""
        self.text += piece
        # Spoken text starts at its first non-space character, as the whole-text prompt does;
        # NFC (the tokenizer's own normaliser) first, so offsets agree between the two calls.
        text = unicodedata.normalize("NFC", self.text).lstrip()
        if finished:
            text = text.rstrip()
        if not text:
            return []
        ids, offsets = self._tokens(text)
        if finished:
            final = len(ids)
        else:
            pieces = self._pre_tokenizer.pre_tokenize_str(text)
            safe_end = pieces[-1][1][0] if pieces else 0
            final = sum(1 for _start, end in offsets if end <= safe_end)
        if ids[: len(self.committed)] != self.committed:
            raise RuntimeError("committed tokens changed: the text was not split where it is safe")
        new = ids[len(self.committed) : final]
        self.committed.extend(new)
        return new
