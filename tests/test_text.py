"""Text segmentation: sentences, streamed text, and overlong sentences."""

from __future__ import annotations

from wyoming_qwen3tts.text import TextPiece, TextSegmenter, split_long, split_text


def test_a_text_splits_into_its_sentences():
    assert split_text("Hello there. How are you? I am fine!") == ["Hello there.", "How are you?", "I am fine!"]


def test_whitespace_and_markdown_emphasis_are_cleaned():
    assert split_text("  The **lights**\n are   on.  ") == ["The lights are on."]
    assert split_text("   \n ") == []


def test_streamed_text_yields_a_sentence_once_the_next_one_begins():
    segmenter = TextSegmenter()
    assert segmenter.add("Good morning, the kitchen ") == []
    assert segmenter.add("lights are on. No") == [TextPiece("Good morning, the kitchen lights are on.", ends_segment=True)]
    assert segmenter.add("w it is late") == []
    assert segmenter.finish() == [TextPiece("Now it is late", ends_segment=True)]


def test_an_overlong_sentence_is_cut_at_clauses_then_spaces():
    clauses = ", ".join(f"clause number {i} goes here" for i in range(30))
    pieces = split_long(clauses, max_chars=100)
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith(",") for p in pieces[:-1]), pieces
    assert " ".join(pieces) == clauses

    words = " ".join(["word"] * 100)
    pieces = split_long(words, max_chars=60)
    assert all(len(p) <= 60 for p in pieces) and " ".join(pieces) == words

    unbroken = "x" * 250
    assert split_long(unbroken, max_chars=100) == ["x" * 100, "x" * 100, "x" * 50]
