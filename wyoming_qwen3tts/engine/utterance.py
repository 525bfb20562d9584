"""One utterance (one text segment in one voice): frames in, PCM chunks out, a frame at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..speech import AudioChunk, SamplingOptions
from .decode import StreamingCodecDecoder
from .generate import FrameGenerator
from .options import ChunkSchedule, StopRules
from .prompt import DualTrackPrompt, TalkerPrompt
from .text_feed import IncrementalTokenizer, TextFeed

if TYPE_CHECKING:
    from qwen_tts import Qwen3TTSModel

@dataclass(frozen=True)
class CodeChunk:
    """Frames generated for one audio chunk, before decoding."""

    codes: torch.Tensor  # [frames, 16] on the model's device
    first_frame: int
    fade: bool  # the utterance hit its frame cap: end the audio with a fade


@dataclass
class ModelRuntime:
    """A loaded checkpoint and the machinery that streams from it."""

    wrapper: "Qwen3TTSModel"
    frames: FrameGenerator
    decoder: StreamingCodecDecoder
    sampling: SamplingOptions  # the checkpoint's own defaults
    folder: Path | None = None  # where the checkpoint was loaded from

    @classmethod
    def create(
        cls,
        wrapper: "Qwen3TTSModel",
        decoder: StreamingCodecDecoder | None = None,
        folder: Path | None = None,
        compile: bool = False,
    ) -> "ModelRuntime":
        sampling = SamplingOptions.from_generation_config(wrapper.generate_defaults)
        frames = FrameGenerator(wrapper.model, compile=compile)
        frames.warm_up(sampling)
        return cls(
            wrapper=wrapper,
            frames=frames,
            decoder=decoder or StreamingCodecDecoder(wrapper.model.speech_tokenizer.model.decoder),
            sampling=sampling,
            folder=folder,
        )


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
    """Generates and decodes one segment; `advance` does at most one frame of work.

    Generation (`advance_codes`) and decoding (`decode`) can also run on two threads: each
    side keeps its own state, and chunks must be decoded in the order they were generated.

    The prompt is either complete up front, or (dual-track streaming) built while the text
    arrives through a `TextFeed`: generation starts with the first word and, at each step,
    waits for the text token that step needs.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        prompt: TalkerPrompt | DualTrackPrompt,
        sampling: SamplingOptions,
        stop: StopRules,
        schedule: ChunkSchedule,
        fade_samples: int = 1920,
        segment: int = 0,
        feed: TextFeed | None = None,
    ) -> None:
        self.runtime = runtime
        self.sampling = sampling
        self.stop = stop
        self.schedule = schedule
        self.fade_samples = fade_samples
        self.segment = segment
        if isinstance(prompt, DualTrackPrompt):
            if feed is None:
                raise ValueError("a dual-track prompt needs the feed its text arrives through")
            self._dual: DualTrackPrompt | None = prompt
            self._feed = feed
            self._tokens = IncrementalTokenizer(runtime.wrapper.processor.tokenizer)
            self._text_complete = False
            self.prompt: TalkerPrompt | None = None
        else:
            self._dual, self._feed, self._tokens = None, None, None
            self._text_complete = True
            self.prompt = prompt
        self._state = None
        self._decoder_state = None
        self._pending: list[torch.Tensor] = []
        self._chunks = 0
        self._emitted_frames = 0

    @property
    def frames(self) -> int:
        """Frames generated so far."""
        return 0 if self._state is None else self._state.frames

    @property
    def finish_reason(self) -> str | None:
        if self._state is None:
            return "empty" if self._text_complete and self.prompt is None else None
        return self._state.finish_reason

    @property
    def finished(self) -> bool:
        if self._state is None:
            return self._text_complete and self.prompt is None
        return self._state.finished and not self._pending

    @property
    def waiting_for_text(self) -> bool:
        """Blocked until more text (or its end) arrives; taking turns would only spin."""
        if self._feed is None or self._text_complete or self._feed.has_news:
            return False
        if self._state is None:
            return self.prompt is None
        return self._state.waiting_for_text

    def cancel(self) -> None:
        if self._state is not None:
            self.runtime.frames.cancel(self._state)
        self._pending.clear()

    def advance(self) -> AudioChunk | None:
        """Prefill, or generate one frame; return a decoded chunk when one is complete."""
        codes = self.advance_codes()
        return None if codes is None else self.decode(codes)

    def advance_codes(self) -> CodeChunk | None:
        """Prefill, or generate one frame; return a chunk's frames when they are complete."""
        if self._feed is not None and not self._text_complete:
            self._take_text()
        if self._state is None:
            if self.prompt is not None:
                self._start()
            return None
        if self._state.finished:
            return self._flush() if self._pending else None
        frame = self.runtime.frames.step(self._state)
        if frame is not None:
            self._pending.append(frame)
        full = len(self._pending) >= self.schedule.frames_in_chunk(self._chunks)
        if self._pending and (self._state.finished or full):
            return self._flush()
        return None

    def _take_text(self) -> None:
        text, finished = self._feed.take()
        if not text and not finished:
            return
        self._dual.add_tokens(self._tokens.push(text, finished=finished))
        self.prompt = self._dual.prompt
        if finished:
            self._dual.finish()
            self._text_complete = True
            if self._state is not None:
                self._state.max_frames = max(self.frames, self.stop.frame_cap(self.prompt.text_tokens))

    def _start(self) -> None:
        runtime = self.runtime
        max_frames = self.stop.frame_cap(self.prompt.text_tokens) if self._text_complete else self.stop.max_frames
        self._state = runtime.frames.start(self.prompt, self.sampling, max_frames)

    def _flush(self) -> CodeChunk:
        chunk = CodeChunk(
            codes=torch.stack(self._pending),
            first_frame=self._emitted_frames,
            fade=self._state.finish_reason == "cap",
        )
        self._pending = []
        self._chunks += 1
        self._emitted_frames += chunk.codes.shape[0]
        return chunk

    def decode(self, chunk: CodeChunk) -> AudioChunk:
        """The audio of ``chunk``; chunks must come in the order `advance_codes` made them."""
        decoder = self.runtime.decoder
        if self._decoder_state is None:
            self._decoder_state = decoder.new_state()
            if self.prompt.ref_codes is not None:
                # A cloned voice's audio continues its reference: decode that first, as context.
                decoder.decode(self._decoder_state, self.prompt.ref_codes)
        audio = decoder.decode(self._decoder_state, chunk.codes).cpu().numpy()
        if chunk.fade:
            # Runaway guard: end with a fade rather than a cut in the middle of a sound.
            audio = fade_out(audio, self.fade_samples)
        return AudioChunk(audio=audio, first_frame=chunk.first_frame, segment=self.segment)
