"""One utterance (one text segment in one voice) as state: its prompt, frames and chunks so far."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..speech import AudioChunk, SamplingOptions
from .generate import GenerationState
from .options import ChunkSchedule, StopRules
from .prompt import DualTrackPrompt, TalkerPrompt
from .text_feed import IncrementalTokenizer, TextFeed


@dataclass(frozen=True)
class CodeChunk:
    """Frames generated for one audio chunk, before decoding."""

    codes: torch.Tensor  # [frames, 16] on the model's device
    first_frame: int
    fade: bool  # the utterance hit its frame cap: end the audio with a fade

    @property
    def frames(self) -> int:
        return self.codes.shape[0]


def fade_out(audio: np.ndarray, samples: int) -> np.ndarray:
    """Raised-cosine fade to silence over the last ``samples`` samples."""
    samples = min(samples, len(audio))
    if samples <= 0:
        return audio
    ramp = 0.5 * (1.0 + np.cos(np.linspace(0.0, np.pi, samples, dtype=np.float64)))
    faded = audio.copy()
    faded[-samples:] = (faded[-samples:] * ramp).astype(audio.dtype)
    return faded


class Utterance:
    """One segment's progress: its prompt, its frames so far, its chunks; nothing else.

    An utterance never runs the model: the model side (`runtime.ModelRuntime`) prefills it, steps
    it (together with other utterances of the same model) and decodes its chunks. Generation and
    decoding may happen on two threads: each side keeps its own state, and chunks must be decoded
    in the order they were made.

    The prompt is either complete up front, or (dual-track streaming) built while the text
    arrives through a `TextFeed`: generation starts with the first word and, at each step,
    waits for the text token that step needs.
    """

    def __init__(
        self,
        prompt: TalkerPrompt | DualTrackPrompt,
        sampling: SamplingOptions,
        stop: StopRules,
        schedule: ChunkSchedule,
        fade_samples: int = 1920,
        segment: int = 0,
        feed: TextFeed | None = None,
    ) -> None:
        self.sampling = sampling
        self.stop = stop
        self.schedule = schedule
        self.fade_samples = fade_samples
        self.segment = segment
        if isinstance(prompt, DualTrackPrompt):
            if feed is None:
                raise ValueError("a dual-track prompt needs the feed its text arrives through")
            self.dual: DualTrackPrompt | None = prompt
            self.feed: TextFeed | None = feed
            self.tokens: IncrementalTokenizer | None = IncrementalTokenizer(prompt.wrapper.processor.tokenizer)
            self._text_complete = False
            self.prompt: TalkerPrompt | None = None
        else:
            self.dual, self.feed, self.tokens = None, None, None
            self._text_complete = True
            self.prompt = prompt
        self.state: GenerationState | None = None  # set by the prefill
        self.decoder_state = None  # the codec's, kept by the decoding side
        self._pending: list[torch.Tensor] = []
        self._chunks = 0
        self._emitted_frames = 0

    @property
    def frames(self) -> int:
        """Frames generated so far."""
        return 0 if self.state is None else self.state.frames

    @property
    def finish_reason(self) -> str | None:
        if self.state is None:
            return "empty" if self._text_complete and self.prompt is None else None
        return self.state.finish_reason

    @property
    def finished(self) -> bool:
        if self.state is None:
            return self._text_complete and self.prompt is None
        return self.state.finished and not self._pending

    @property
    def has_text_news(self) -> bool:
        """Text (or its end) arrived that the prompt has not taken yet."""
        return self.feed is not None and not self._text_complete and self.feed.has_news

    @property
    def needs_prefill(self) -> bool:
        return self.state is None and self.prompt is not None

    @property
    def waiting_for_text(self) -> bool:
        """Blocked until more text (or its end) arrives; taking turns would only spin."""
        if self.feed is None or self._text_complete or self.feed.has_news:
            return False
        if self.state is None:
            return self.prompt is None
        return self.state.waiting_for_text

    @property
    def steppable(self) -> bool:
        """Ready for the next batched step (which also flushes the frames of a finished one)."""
        return self.state is not None and not self.finished and not self.waiting_for_text

    @property
    def frame_cap(self) -> int:
        if self._text_complete:
            return self.stop.frame_cap(self.prompt.text_tokens)
        return self.stop.max_frames

    def text_grew(self, complete: bool) -> None:
        """The dual-track prompt took new tokens (and, when ``complete``, the end of the text)."""
        self.prompt = self.dual.prompt
        if complete:
            self._text_complete = True
            if self.state is not None:
                self.state.max_frames = max(self.frames, self.frame_cap)

    def cancel(self) -> None:
        if self.state is not None and not self.state.finished:
            self.state.finish("cancelled")
        self._pending.clear()

    def take_frame(self, frame: torch.Tensor | None) -> CodeChunk | None:
        """Keep a frame the last step made (None: it made none); a chunk's frames once complete."""
        if frame is not None:
            self._pending.append(frame)
        full = len(self._pending) >= self.schedule.frames_in_chunk(self._chunks)
        if self._pending and (self.state.finished or full):
            return self._flush()
        return None

    def _flush(self) -> CodeChunk:
        chunk = CodeChunk(
            codes=torch.stack(self._pending),
            first_frame=self._emitted_frames,
            fade=self.state.finish_reason == "cap",
        )
        self._pending = []
        self._chunks += 1
        self._emitted_frames += chunk.codes.shape[0]
        return chunk

    def audio_chunk(self, chunk: CodeChunk, audio: np.ndarray) -> AudioChunk:
        """The decoded audio of ``chunk`` as it goes to the listener."""
        if chunk.fade:
            # Runaway guard: end with a fade rather than a cut in the middle of a sound.
            audio = fade_out(audio, self.fade_samples)
        return AudioChunk(audio=audio, first_frame=chunk.first_frame, segment=self.segment)
