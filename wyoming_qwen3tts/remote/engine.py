"""Speech from remote OpenAI-compatible servers (vLLM-Omni, or another instance of this server).

The same `SpeechBackend` as the local engine. One segment (sentence) is one request, sent to
the least busy healthy replica; a replica that fails before any audio of a segment is left for
another one. Clone samples are uploaded once per replica where it accepts uploads
(`POST /v1/audio/voices`), otherwise sent with every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from ..openai_wire import SpeechBody
from ..speech import (
    PUBLISHED_LANGUAGES,
    AudioChunk,
    CloneSource,
    JobCancelled,
    JobStats,
    PresetSpeaker,
    ReferenceClone,
    RequestOptions,
    VoiceSpec,
    from_pcm16,
)
from .client import RemoteError, ReplicaFailed, fetch_listings, stream_speech, upload_clone
from .replicas import NoReplicaError, Replica, ReplicaPool

_LOGGER = logging.getLogger(__name__)

__all__ = ["RemoteEngine", "RemoteError", "RemoteOptions", "NoReplicaError"]


def base_url(url: str) -> str:
    """A server's root URL, whether given with or without the `/v1` that OpenAI clients use."""
    url = url.strip().rstrip("/")
    return url.removesuffix("/v1").rstrip("/")


@dataclass(frozen=True)
class RemoteOptions:
    urls: tuple[str, ...]
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists
    connect_timeout: float = 5.0
    first_byte_timeout: float = 60.0
    read_timeout: float = 60.0
    retry_after: float = 10.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("the remote engine needs at least one server URL")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"remote URL {url!r} must start with http:// or https://")
        object.__setattr__(self, "urls", tuple(base_url(url) for url in self.urls))
        if min(self.connect_timeout, self.first_byte_timeout, self.read_timeout) <= 0:
            raise ValueError("remote timeouts must be positive")


class RemoteEngine:
    """A `SpeechBackend` over one or more remote speech servers."""

    def __init__(self, options: RemoteOptions) -> None:
        self.options = options
        self.pool = ReplicaPool(list(options.urls), retry_after=options.retry_after)
        self._session: aiohttp.ClientSession | None = None
        self._voices: dict[str, str] = {}  # lower-case name -> the name as the remote spells it
        self._voice_tasks: dict[str, str] = {}
        self._can_clone = False
        self.ready = False  # a replica has answered and its voices are known
        self.model: str | None = options.model
        self.jobs: set[RemoteJob] = set()  # started, not yet ended

    # Setup

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.options.connect_timeout, sock_read=self.options.read_timeout)
            headers = {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}
            self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)
        return self._session

    async def connect(self, quiet: bool = False) -> None:
        """Learn voices (and the model name) from the first replica that answers."""
        errors = []
        for replica in self.pool.replicas:
            try:
                voices, models = await fetch_listings(self.session, replica, want_models=self.model is None)
            except ReplicaFailed as err:
                errors.append(f"{replica.url}: {err}")
                self.pool.mark_down(replica, str(err), quiet=quiet)
                continue
            self.pool.mark_up(replica)
            if self.model is None:
                self.model = models.ids[0] if models.ids else None
            clones = voices.clone_names
            for name in voices.voices:
                self._voices[name.lower()] = name
                self._voice_tasks[name.lower()] = "Base" if name in clones else "CustomVoice"
            # Our own servers say whether they clone; a vLLM-Omni server clones when it serves a Base model.
            self._can_clone = voices.can_clone if voices.can_clone is not None else "base" in (self.model or "").lower()
            _LOGGER.info("Remote engine: %d voices from %s (model %s)", len(self._voices), replica.url, self.model)
            self.ready = True
            return
        raise NoReplicaError("no remote speech server answered: " + "; ".join(errors))

    async def wait_ready(self, first_delay: float = 1.0, max_delay: float = 30.0) -> None:
        """Try `connect` until a replica answers, waiting longer after each miss (up to ``max_delay``)."""
        delay = first_delay
        while not self.ready:
            await asyncio.sleep(delay)
            try:
                await self.connect(quiet=True)
            except NoReplicaError as err:
                _LOGGER.debug("Still waiting for a remote speech server: %s", err)
                delay = min(max_delay, delay * 2)

    @property
    def active_jobs(self) -> int:
        return len(self.jobs)

    async def aclose(self) -> None:
        for job in list(self.jobs):
            job.cancel()
        if self._session is not None:
            await self._session.close()

    # What the remote offers

    @property
    def speakers(self) -> list[str]:
        return list(self._voices.values())

    def speaker_dialect(self, speaker: str) -> str | None:
        return None

    @property
    def languages(self) -> list[str]:
        return list(PUBLISHED_LANGUAGES)  # a remote server does not list them

    @property
    def can_clone(self) -> bool:
        return self._can_clone

    def streams_text(self, voice: VoiceSpec) -> bool:
        return False  # the speech API takes whole texts: one request per segment

    async def clone(self, source: CloneSource) -> tuple[ReferenceClone, bool]:
        return ReferenceClone.from_sample(source.audio_bytes, source.filename, source.transcript), False

    # Synthesis

    def start(self, voice: VoiceSpec, request: RequestOptions = RequestOptions()) -> "RemoteJob":
        if isinstance(voice, PresetSpeaker) and voice.name.lower() not in self._voices:
            raise ValueError(f"Unknown speaker {voice.name!r}; the remote has: {', '.join(self.speakers)}")
        if not isinstance(voice, (PresetSpeaker, ReferenceClone)):
            raise ValueError(f"The remote engine speaks preset speakers and reference clones, not {type(voice).__name__}")
        return RemoteJob(self, voice, request)

    def _body(self, text: str, voice: PresetSpeaker | ReferenceClone, request: RequestOptions, replica: Replica) -> SpeechBody:
        body = SpeechBody.for_request(text, request, model=self.model, response_format="pcm", stream=True, stream_format="audio")
        if isinstance(voice, PresetSpeaker):
            body.voice = self._voices[voice.name.lower()]
            body.task_type = self._voice_tasks[voice.name.lower()]
            return body
        body.task_type = "Base"
        uploaded = replica.uploaded.get(voice.key)
        if uploaded:
            body.voice = uploaded
        else:
            body.ref_audio = voice.data_uri
            if voice.transcript:
                body.ref_text = voice.transcript
            else:
                body.x_vector_only_mode = True
        return body

    async def stream_segment(self, text: str, voice: PresetSpeaker | ReferenceClone, request: RequestOptions) -> AsyncIterator[bytes]:
        """PCM of one segment from the least busy replica; retried once elsewhere before any audio."""
        tried: set[Replica] = set()
        while True:
            replica = self.pool.pick(tried)
            tried.add(replica)
            replica.active += 1
            sent_audio = False
            try:
                if isinstance(voice, ReferenceClone):
                    await upload_clone(self.session, replica, voice)
                body = self._body(text, voice, request, replica)
                async for pcm in stream_speech(self.session, replica, body, self.options.first_byte_timeout):
                    sent_audio = True
                    yield pcm
                self.pool.mark_up(replica)
                return
            except ReplicaFailed as err:
                self.pool.mark_down(replica, str(err))
                if sent_audio or len(tried) >= 2:
                    raise RemoteError(f"the remote speech server failed mid-way ({err})") from err
                _LOGGER.info("Retrying on another replica: %s failed before any audio (%s)", replica.url, err)
            finally:
                replica.active -= 1


class RemoteJob:
    """One request to the remote engine: a `SpeechJob`."""

    def __init__(self, engine: RemoteEngine, voice: PresetSpeaker | ReferenceClone, request: RequestOptions) -> None:
        self.engine = engine
        self.voice = voice
        self.request = request
        self._segments: asyncio.Queue[str | None] = asyncio.Queue()
        self._open: list[str] = []  # appended text of the segment not yet closed
        self._finished = False
        self._cancelled = False
        self.stats = JobStats()
        engine.jobs.add(self)

    def add_text(self, text: str) -> None:
        if self._finished:
            raise RuntimeError("add_text() after finish()")
        self.close_segment()
        if text.strip():
            self.stats.characters += len(text)
            self._segments.put_nowait(text)

    def append_text(self, piece: str) -> None:
        """Text for the open segment; it is sent whole once the segment closes."""
        if self._finished:
            raise RuntimeError("append_text() after finish()")
        self.stats.characters += len(piece)
        self._open.append(piece)

    def close_segment(self) -> None:
        text = "".join(self._open)
        self._open.clear()
        if text.strip():
            self._segments.put_nowait(text)

    def finish(self) -> None:
        if not self._finished:
            self.close_segment()
            self._finished = True
            self._segments.put_nowait(None)

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._segments.put_nowait(None)
            self._uncount()

    def _uncount(self) -> None:
        if self in self.engine.jobs:
            self.engine.jobs.discard(self)
            self.stats.finished = time.monotonic()

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[AudioChunk]:
        try:
            while True:
                text = await self._segments.get()
                if self._cancelled:
                    raise JobCancelled("remote job cancelled")
                if text is None:
                    return
                async for chunk in self._segment(text):
                    yield chunk
                self.stats.end_segment("remote")
        except Exception as err:
            if self._cancelled and not isinstance(err, JobCancelled):  # e.g. the session closed under it
                raise JobCancelled("remote job cancelled") from err
            raise
        finally:
            self._uncount()

    async def _segment(self, text: str) -> AsyncIterator[AudioChunk]:
        carry = b""
        async for data in self.engine.stream_segment(text, self.voice, self.request):
            if self._cancelled:
                raise JobCancelled("remote job cancelled")
            data = carry + data
            usable = len(data) - len(data) % 2
            carry = data[usable:]
            if usable:
                chunk = AudioChunk(audio=from_pcm16(data[:usable]), segment=self.stats.segments)
                self.stats.record(chunk)
                yield chunk
