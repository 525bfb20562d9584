"""Speech from remote OpenAI-compatible servers, behind the same interface as the local engine.

Requests use vLLM-Omni's shape for Qwen3-TTS: `input`, `model`, `voice`, `language`,
`task_type` (CustomVoice | Base), `ref_audio` + `ref_text` for clones, `response_format: pcm`,
`stream: true` with `stream_format: audio`, and raw 24 kHz 16-bit PCM is read as it streams.
Clone samples are uploaded once per replica where it accepts uploads (`POST /v1/audio/voices`),
otherwise sent with every request. One segment (sentence) is one request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import mimetypes
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np

from ..engine.engine import RequestOptions
from ..engine.prompt import PresetSpeaker
from ..engine.utterance import AudioChunk
from ..engine.worker import JobCancelled, JobStats
from .replicas import NoReplicaError, Replica, ReplicaPool

_LOGGER = logging.getLogger(__name__)

# The languages of the published Qwen3-TTS checkpoints; a remote server does not list them.
LANGUAGES = ["auto", "chinese", "english", "german", "italian", "portuguese", "spanish", "japanese", "korean", "french", "russian"]
UPLOAD_CONSENT = "wyoming-qwen3tts"


class RemoteError(RuntimeError):
    """The remote server refused or failed the request; the message is the server's."""


class _ReplicaFailed(Exception):
    """The replica itself failed (connection, timeout, 5xx): try another one."""


@dataclass(frozen=True)
class RemoteOptions:
    urls: tuple[str, ...]
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists
    connect_timeout: float = 5.0
    first_byte_timeout: float = 60.0
    read_timeout: float = 60.0
    retry_after: float = 10.0


@dataclass(frozen=True)
class RemoteClone:
    """A configured clone voice, sent to the remote as its sample and transcript."""

    audio: bytes
    mime: str
    transcript: str | None

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.audio)
        digest.update((self.transcript or "").encode())
        return digest.hexdigest()[:16]

    @classmethod
    def from_sample(cls, audio: bytes, path: Path, transcript: str | None) -> "RemoteClone":
        mime = mimetypes.guess_type(path.name)[0] or "audio/wav"
        return cls(audio=audio, mime=mime, transcript=transcript)


class RemoteEngine:
    """Looks like `SpeechEngine` to the Wyoming server and the HTTP API."""

    def __init__(self, options: RemoteOptions) -> None:
        self.options = options
        self.pool = ReplicaPool(list(options.urls), retry_after=options.retry_after)
        self._session: aiohttp.ClientSession | None = None
        self._voices: dict[str, str] = {}  # lower-case name -> (name as the remote spells it)
        self._voice_tasks: dict[str, str] = {}
        self.model: str | None = options.model
        self.active_jobs = 0

    # Setup

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.options.connect_timeout, sock_read=self.options.read_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers())
        return self._session

    async def connect(self) -> None:
        """Learn voices (and the model name) from the first replica that answers."""
        errors = []
        for replica in self.pool.replicas:
            try:
                async with self.session.get(f"{replica.url}/v1/audio/voices") as response:
                    response.raise_for_status()
                    listing = await response.json()
                if self.model is None:
                    async with self.session.get(f"{replica.url}/v1/models") as response:
                        response.raise_for_status()
                        models = (await response.json()).get("data") or []
                        self.model = models[0]["id"] if models else None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as err:
                errors.append(f"{replica.url}: {err}")
                self.pool.mark_down(replica, str(err))
                continue
            self._learn_voices(listing)
            _LOGGER.info("Remote engine: %d voices from %s (model %s)", len(self._voices), replica.url, self.model)
            return
        raise NoReplicaError("no remote speech server answered: " + "; ".join(errors))

    def _learn_voices(self, listing: dict) -> None:
        uploaded = {v.get("name") for v in listing.get("uploaded_voices") or [] if isinstance(v, dict)}
        clones = {d.get("name") for d in listing.get("data") or [] if isinstance(d, dict) and d.get("clone")}
        for name in listing.get("voices") or []:
            if isinstance(name, str) and name:
                self._voices[name.lower()] = name
                self._voice_tasks[name.lower()] = "Base" if name in uploaded | clones else "CustomVoice"

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    # What the remote offers (the same questions the local engine answers)

    @property
    def speakers(self) -> list[str]:
        return list(self._voices.values())

    def speaker_dialect(self, speaker: str) -> str | None:
        return None

    @property
    def languages(self) -> list[str]:
        return list(LANGUAGES)

    @property
    def can_clone(self) -> bool:
        return True

    @staticmethod
    def streams_text(voice) -> bool:
        return False  # one request per sentence: the speech API takes whole texts

    # Synthesis

    def start(self, voice, request: RequestOptions = RequestOptions(), loop=None) -> "RemoteJob":
        if isinstance(voice, PresetSpeaker) and voice.name.lower() not in self._voices:
            raise ValueError(f"Unknown speaker {voice.name!r}; the remote has: {', '.join(self.speakers)}")
        if not isinstance(voice, (PresetSpeaker, RemoteClone)):
            raise ValueError("the remote engine speaks preset voices and RemoteClone voices")
        return RemoteJob(self, voice, request)

    def _body(self, text: str, voice, request: RequestOptions, replica: Replica) -> dict:
        language = request.language or "auto"
        body = {
            "input": text,
            "model": self.model,
            "language": "Auto" if language == "auto" else language.capitalize(),
            "response_format": "pcm",
            "stream": True,
            "stream_format": "audio",
        }
        if isinstance(voice, PresetSpeaker):
            body["voice"] = self._voices[voice.name.lower()]
            body["task_type"] = self._voice_tasks[voice.name.lower()]
        else:
            body["task_type"] = "Base"
            uploaded = replica.uploaded.get(voice.key)
            if uploaded:
                body["voice"] = uploaded
            else:
                body["ref_audio"] = f"data:{voice.mime};base64," + base64.b64encode(voice.audio).decode()
                if voice.transcript:
                    body["ref_text"] = voice.transcript
                else:
                    body["x_vector_only_mode"] = True
        if request.instruct:
            body["instructions"] = request.instruct
        if self.model is None:
            del body["model"]
        return body

    async def _upload(self, replica: Replica, voice: RemoteClone) -> None:
        """Upload a clone sample once per replica, where the server accepts uploads."""
        if replica.accepts_uploads is False or voice.key in replica.uploaded:
            return
        form = aiohttp.FormData()
        name = f"wq3-{voice.key}"
        form.add_field("audio_sample", voice.audio, filename=f"{name}.audio", content_type=voice.mime)
        form.add_field("consent", UPLOAD_CONSENT)
        form.add_field("name", name)
        if voice.transcript:
            form.add_field("ref_text", voice.transcript)
        try:
            async with self.session.post(f"{replica.url}/v1/audio/voices", data=form) as response:
                if response.status in (404, 405, 501):
                    replica.accepts_uploads = False
                    return
                if response.status >= 400:
                    _LOGGER.warning("Remote %s refused the voice upload (%d); sending the sample per request", replica.url, response.status)
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise _ReplicaFailed(str(err)) from err
        replica.accepts_uploads = True
        replica.uploaded[voice.key] = name

    async def stream_segment(self, text: str, voice, request: RequestOptions) -> AsyncIterator[bytes]:
        """PCM of one segment from the least busy replica; retried once elsewhere before any audio."""
        tried: set[Replica] = set()
        while True:
            replica = self.pool.pick(tried)
            tried.add(replica)
            replica.active += 1
            sent_audio = False
            try:
                if isinstance(voice, RemoteClone):
                    await self._upload(replica, voice)
                async for pcm in self._request(replica, self._body(text, voice, request, replica)):
                    sent_audio = True
                    yield pcm
                self.pool.mark_up(replica)
                return
            except _ReplicaFailed as err:
                self.pool.mark_down(replica, str(err))
                if sent_audio or len(tried) >= 2:
                    raise RemoteError(f"the remote speech server failed mid-way ({err})") from err
                _LOGGER.info("Retrying on another replica: %s failed before any audio (%s)", replica.url, err)
            finally:
                replica.active -= 1

    async def _request(self, replica: Replica, body: dict) -> AsyncIterator[bytes]:
        url = f"{replica.url}/v1/audio/speech"
        try:
            async with asyncio.timeout(self.options.first_byte_timeout):
                response = await self.session.post(url, json=body)
                try:
                    if response.status >= 400:
                        message = await _error_message(response)
                        if response.status >= 500:
                            raise _ReplicaFailed(f"{response.status}: {message}")
                        raise RemoteError(message)
                    first = await response.content.readany()
                except BaseException:
                    response.release()
                    raise
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as err:
            raise _ReplicaFailed(f"{type(err).__name__}: {err}") from err
        complete = False
        try:
            sse = response.content_type == "text/event-stream"
            chunks = _sse_audio(response, first) if sse else _raw(response, first)
            async for pcm in chunks:
                yield pcm
            complete = True
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as err:
            raise _ReplicaFailed(f"{type(err).__name__}: {err}") from err
        finally:
            if complete:
                response.release()
            else:  # an abandoned stream drops its connection, so the server stops generating
                response.close()


async def _error_message(response: aiohttp.ClientResponse) -> str:
    text = await response.text()
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return f"HTTP {response.status}: {text[:200]}"


async def _raw(response: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for data in response.content.iter_any():
        yield data


async def _sse_audio(response: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
    buffer = first
    async for data in _raw(response, b""):
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = json.loads(line[5:])
                    if payload.get("type") == "speech.audio.delta":
                        yield base64.b64decode(payload["audio"])
                    elif payload.get("type") == "speech.audio.error":
                        raise RemoteError(str(payload.get("error")))


class RemoteJob:
    """One request to the remote engine: segments in, audio chunks out (like SynthesisJob)."""

    def __init__(self, engine: RemoteEngine, voice, request: RequestOptions) -> None:
        self.engine = engine
        self.voice = voice
        self.request = request
        self._segments: asyncio.Queue[str | None] = asyncio.Queue()
        self._finished = False
        self._cancelled = False
        self.stats = JobStats(created=time.monotonic())
        engine.active_jobs += 1
        self._counted = True

    def add_text(self, text: str) -> None:
        if text.strip():
            self.stats.characters += len(text)
            self._segments.put_nowait(text)

    def append_text(self, piece: str) -> None:
        raise NotImplementedError("the remote engine takes whole segments (streams_text is False)")

    def close_segment(self) -> None:
        pass

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._segments.put_nowait(None)

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._segments.put_nowait(None)
            self._uncount()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.engine.active_jobs -= 1
            self.stats.finished = time.monotonic()

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[AudioChunk]:
        try:
            while True:
                text = await self._segments.get()
                if self._cancelled:
                    raise JobCancelled("remote job cancelled")
                if text is None:
                    return
                carry = b""
                async for data in self.engine.stream_segment(text, self.voice, self.request):
                    data = carry + data
                    usable = len(data) - len(data) % 2
                    carry = data[usable:]
                    if not usable:
                        continue
                    audio = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32767.0
                    chunk = AudioChunk(audio=audio, segment=self.stats.segments)
                    if self.stats.first_audio is None:
                        self.stats.first_audio = time.monotonic()
                    self.stats.audio_seconds += chunk.seconds
                    self.stats.frames += chunk.frames
                    yield chunk
                self.stats.segments += 1
                self.stats.finish_reasons.append("remote")
        finally:
            self._uncount()
