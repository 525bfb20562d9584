"""The request layer both edges share: voice lookup, limits, options, and text into a job.

An edge (the Wyoming handler, the HTTP app) only translates its protocol into calls here and
the audio chunks back into its protocol. Everything a request means, whichever edge it came
through, is decided in this module.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .reference_audio import ReferenceAudioError, clone_source
from .speech import RequestOptions, SpeechBackend, SpeechJob
from .text import Segmenter, TextSegmenter, WordStreamSegmenter, split_text
from .voices import Voice, VoiceCatalog

STREAM_TEXT_BY = ("words", "sentences")


@dataclass(frozen=True)
class RequestLayerOptions:
    """What every request is held to, and what it gets when it does not say."""

    max_text_chars: int = 20_000  # most characters one request may ask to speak
    # Streamed text enters the model "words" (dual track: speech starts after the first words)
    # or by "sentences".
    stream_text_by: str = "words"
    defaults: RequestOptions = field(default_factory=RequestOptions)

    def __post_init__(self) -> None:
        if self.max_text_chars < 1:
            raise ValueError(f"the text limit must be at least 1 character, not {self.max_text_chars}")
        if self.stream_text_by not in STREAM_TEXT_BY:
            raise ValueError(f"stream_text_by must be one of {', '.join(STREAM_TEXT_BY)}, not {self.stream_text_by!r}")


class RequestError(ValueError):
    """A request that cannot be served as asked; ``code`` and ``param`` say what was wrong."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class TextStream:
    """A request whose text arrives in pieces (Wyoming's synthesize-chunk)."""

    def __init__(self, job: SpeechJob, segmenter: Segmenter, max_chars: int) -> None:
        self.job = job
        self.segmenter = segmenter
        self.max_chars = max_chars
        self.chars = 0

    def feed(self, text: str) -> None:
        self.chars += len(text)
        if self.chars > self.max_chars:
            raise RequestError(f"Streamed text is over the limit of {self.max_chars} characters", "text-too-long", "text")
        self._apply(self.segmenter.add(text))

    def end(self) -> None:
        self._apply(self.segmenter.finish())
        self.job.finish()

    def _apply(self, pieces) -> None:
        for piece in pieces:
            if not self.segmenter.streams:
                self.job.add_text(piece.text)
                continue
            if piece.text:
                self.job.append_text(piece.text)
            if piece.ends_segment:
                self.job.close_segment()


class SpeechRequests:
    """Opens jobs on one backend for the voices of one catalog."""

    def __init__(self, backend: SpeechBackend, catalog: VoiceCatalog, options: RequestLayerOptions = RequestLayerOptions()) -> None:
        self.backend = backend
        self.catalog = catalog  # replaced when the backend's voices change (a remote answering late)
        self.options = options
        self.tasks: list[asyncio.Task] = []  # background work for this layer (a catalog still to come)

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.backend.aclose()

    def voice(self, name: str | None) -> Voice:
        """The named voice (any case), the default for no name."""
        if not self.catalog.voices:
            raise RequestError(
                "No voices yet: the speech servers have not answered; this server keeps trying, ask again shortly",
                "no-voices",
                "voice",
            )
        voice = self.catalog.find(name)
        if voice is None:
            raise RequestError(
                f"Unknown voice {name!r}. Available voices: {', '.join(self.catalog.names)}", "unknown-voice", "voice"
            )
        return voice

    async def one_off_clone(self, audio_bytes: bytes, transcript: str | None, param: str = "reference_audio") -> Voice:
        """A voice cloned from a sample sent with the request (not added to the catalog)."""
        if not self.backend.can_clone:
            raise RequestError(
                "This server's speech backend cannot clone voices: a local engine needs its Base model "
                "(--http-clones), a remote one a server that clones",
                "cloning-off",
                param,
            )
        try:
            # Decoding and resampling take a while: keep them off the event loop.
            source = await asyncio.to_thread(clone_source, audio_bytes, param, transcript)
        except ReferenceAudioError as err:
            raise RequestError(str(err), "bad-reference-audio", param) from err
        spec, _computed = await self.backend.clone(source)
        return Voice(name="one-off clone", description="one-off clone", languages=[], spec=spec)

    def request_options(self, voice: Voice, language: str | None = None, **changes) -> RequestOptions:
        """The options of one request: the layer's defaults, the voice's language, the request's own."""
        language = (language or "").strip().lower()
        if language in ("", "auto"):
            language = voice.language
        if language not in self.backend.languages:
            raise RequestError(
                f"Unknown language {language!r}; use one of {', '.join(self.backend.languages)}", "unknown-language", "language"
            )
        try:
            return self.options.defaults.updated(language=language, **changes)
        except ValueError as err:
            raise RequestError(str(err), "bad-option") from err

    def _check_length(self, chars: int) -> None:
        if chars > self.options.max_text_chars:
            raise RequestError(
                f"Text of {chars} characters is over the limit of {self.options.max_text_chars}", "text-too-long", "input"
            )

    def _start(self, voice: Voice, options: RequestOptions) -> SpeechJob:
        try:
            return self.backend.start(voice.spec, options)
        except ValueError as err:
            raise RequestError(str(err), "unknown-voice", "voice") from err

    def speak(self, text: str, voice: Voice, options: RequestOptions | None = None) -> SpeechJob:
        """A job speaking a complete text, sentence by sentence."""
        self._check_length(len(text))
        job = self._start(voice, options or self.request_options(voice))
        for segment in split_text(text):
            job.add_text(segment)
        job.finish()
        return job

    def open_stream(self, voice: Voice, options: RequestOptions | None = None) -> TextStream:
        """A job whose text will arrive in pieces."""
        job = self._start(voice, options or self.request_options(voice))
        by_words = self.options.stream_text_by == "words" and self.backend.streams_text(voice.spec)
        segmenter = WordStreamSegmenter() if by_words else TextSegmenter()
        return TextStream(job, segmenter, self.options.max_text_chars)
