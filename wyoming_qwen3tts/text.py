"""Text into speakable segments: sentences, with overlong ones cut at a clause or a space.

Each segment is generated on its own, so its length bounds one generation: the model stays on
track, a runaway is capped early, and the listener hears the first sentence while later ones
are still being made. Sentence boundaries come from `sentence-stream`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple, Protocol

from sentence_stream import SentenceBoundaryDetector

# Where an overlong sentence may be cut, best first.
_CLAUSE_END = re.compile(r"[,;:，、；：—–]\s+|[,;:，、；：]")
_SPACE = re.compile(r"\s+")
_WHITESPACE = re.compile(r"\s+")

DEFAULT_MAX_SEGMENT_CHARS = 300


def normalise(text: str) -> str:
    """One line of text with single spaces."""
    return _WHITESPACE.sub(" ", text).strip()


def cut_point(text: str, max_chars: int) -> int:
    """Where to cut ``text`` to keep at most ``max_chars``: after a clause mark, else a space."""
    if len(text) <= max_chars:
        return len(text)
    window = text[: max_chars + 1]
    for pattern in (_CLAUSE_END, _SPACE):
        # The last break in the window, but not so early that we make tiny pieces.
        ends = [m.end() for m in pattern.finditer(window) if max_chars // 3 <= m.end() <= max_chars]
        if ends:
            return ends[-1]
    return max_chars


def split_long(sentence: str, max_chars: int = DEFAULT_MAX_SEGMENT_CHARS) -> list[str]:
    """Cut a sentence longer than ``max_chars`` at clause marks, else at spaces, else hard."""
    pieces: list[str] = []
    rest = sentence.strip()
    while rest:
        cut = cut_point(rest, max_chars)
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    return [p for p in pieces if p]


class TextPiece(NamedTuple):
    """Text for the model, and whether its segment ends after it."""

    text: str
    ends_segment: bool


class Segmenter(Protocol):
    """Streamed text in, pieces for the model out."""

    # True: pieces stream into an open segment as they come (dual track); False: every piece is
    # a whole segment.
    streams: bool

    def add(self, chunk: str) -> list[TextPiece]:
        """Pieces that ``chunk`` completes."""

    def finish(self) -> list[TextPiece]:
        """Whatever is left, once no more text will come."""


class TextSegmenter:
    """Feeds streamed text through sentence detection; every piece is a whole segment."""

    streams = False

    def __init__(self, max_chars: int = DEFAULT_MAX_SEGMENT_CHARS) -> None:
        self.max_chars = max_chars
        self._detector = SentenceBoundaryDetector()

    def add(self, chunk: str) -> list[TextPiece]:
        return self._pieces(self._detector.add_chunk(chunk))

    def finish(self) -> list[TextPiece]:
        return self._pieces([self._detector.finish()])

    def _pieces(self, sentences: Iterable[str]) -> list[TextPiece]:
        return [TextPiece(segment, True) for segment in self._segments(sentences)]

    def _segments(self, sentences: Iterable[str]) -> list[str]:
        segments: list[str] = []
        for sentence in sentences:
            sentence = normalise(sentence)
            if sentence:
                segments.extend(split_long(sentence, self.max_chars))
        return segments


def split_text(text: str, max_chars: int = DEFAULT_MAX_SEGMENT_CHARS) -> list[str]:
    """All segments of a complete text."""
    segmenter = TextSegmenter(max_chars)
    return [piece.text for piece in segmenter.add(text) + segmenter.finish()]


class WordStreamSegmenter:
    """Text streamed into the model as it arrives (dual track), cut into segments of sane length.

    Text goes straight through until the segment holds ``soft_chars``; from then on it is held
    until the sentence it is in ends (found by `sentence-stream`), and the segment closes
    there. A sentence that runs past ``hard_chars`` is cut at a clause mark or a space.
    """

    streams = True

    def __init__(self, soft_chars: int = 200, hard_chars: int = 400) -> None:
        self.soft_chars = soft_chars
        self.hard_chars = hard_chars
        self._length = 0  # characters in the open segment
        self._held = ""  # text past the soft limit, waiting for its sentence to end
        self._detector: SentenceBoundaryDetector | None = None

    @staticmethod
    def _clean(chunk: str) -> str:
        # Markdown emphasis is never spoken; line breaks are just spaces.
        return chunk.replace("*", "").replace("\r", " ").replace("\n", " ")

    def add(self, chunk: str) -> list[TextPiece]:
        out: list[TextPiece] = []
        rest = self._clean(chunk)
        while rest:
            if self._detector is None and self._length < self.soft_chars:
                take = rest[: self.soft_chars - self._length]
                out.append(TextPiece(take, False))
                self._length += len(take)
                rest = rest[len(take) :]
                continue
            if self._detector is None:
                self._detector = SentenceBoundaryDetector()
            self._held += rest
            sentences = list(self._detector.add_chunk(rest))
            rest = ""
            if sentences:
                detector = self._detector
                consumed = len(self._held) - len(detector.remaining_text) - len(detector.current_sentence)
                out.append(TextPiece(self._held[:consumed], True))
                rest = self._held[consumed:].lstrip()
                self._reset()
            elif self._length + len(self._held) >= self.hard_chars:
                cut = cut_point(self._held, max(1, self.hard_chars - self._length))
                out.append(TextPiece(self._held[:cut], True))
                rest = self._held[cut:].lstrip()
                self._reset()
        return out

    def finish(self) -> list[TextPiece]:
        out = [TextPiece(self._held, True)]
        self._reset()
        return out

    def _reset(self) -> None:
        self._length = 0
        self._held = ""
        self._detector = None
