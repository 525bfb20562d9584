"""Text into speakable segments: sentences, with overlong ones cut at a clause or a space.

Each segment is generated on its own, so its length bounds one generation: the model stays on
track, a runaway is capped early, and the listener hears the first sentence while later ones
are still being made. Sentence boundaries come from `sentence-stream`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sentence_stream import SentenceBoundaryDetector

# Where an overlong sentence may be cut, best first.
_CLAUSE_END = re.compile(r"[,;:，、；：—–]\s+|[,;:，、；：]")
_SPACE = re.compile(r"\s+")
_WHITESPACE = re.compile(r"\s+")

DEFAULT_MAX_SEGMENT_CHARS = 300


def normalise(text: str) -> str:
    """One line of text with single spaces."""
    return _WHITESPACE.sub(" ", text).strip()


def split_long(sentence: str, max_chars: int = DEFAULT_MAX_SEGMENT_CHARS) -> list[str]:
    """Cut a sentence longer than ``max_chars`` at clause marks, else at spaces, else hard."""
    pieces: list[str] = []
    rest = sentence.strip()
    while len(rest) > max_chars:
        window = rest[: max_chars + 1]
        cut = 0
        for pattern in (_CLAUSE_END, _SPACE):
            # The last break in the window, but not so early that we make tiny pieces.
            ends = [m.end() for m in pattern.finditer(window) if m.end() >= max_chars // 3]
            if ends:
                cut = ends[-1]
                break
        if cut == 0:
            cut = max_chars
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]


class TextSegmenter:
    """Feeds streamed text through sentence detection; yields segments as they complete."""

    def __init__(self, max_chars: int = DEFAULT_MAX_SEGMENT_CHARS) -> None:
        self.max_chars = max_chars
        self._detector = SentenceBoundaryDetector()

    def add(self, chunk: str) -> list[str]:
        """Segments completed by ``chunk``."""
        return self._segments(self._detector.add_chunk(chunk))

    def finish(self) -> list[str]:
        """Whatever text is left, as segments."""
        return self._segments([self._detector.finish()])

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
    return segmenter.add(text) + segmenter.finish()
