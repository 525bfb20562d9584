"""The aiohttp app: POST /v1/audio/speech, GET /v1/models, GET /v1/audio/voices, GET /health.

The wire format is `openai_wire`'s; what a request means (voice, language, limits, segments)
is the request layer's. Synthesis goes through the same backend, queue and fairness as the
Wyoming server.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from .. import __version__
from ..openai_wire import AUDIO_DELTA, AUDIO_DONE, AUDIO_ERROR, ModelListing, SpeechBody, SseEvent, VoiceEntry, VoiceListing, WireError
from ..request import RequestError, SpeechRequests
from ..speech import AudioChunk, JobCancelled
from ..voices import Voice
from .encoders import CONTENT_TYPES, FORMATS, STREAMED_FORMATS, encode, streaming_wav_header
from .errors import ApiError, from_http_exception
from .reference import reference_bytes

_LOGGER = logging.getLogger(__name__)

MODEL_ID = "qwen3-tts"
TASK_TYPES = ("CustomVoice", "Base")
UPLOAD_FIELDS = ("reference_audio", "ref_audio", "file", "audio_sample")


@dataclass(frozen=True)
class HttpApiOptions:
    """How the HTTP API listens and what it accepts."""

    host: str = "127.0.0.1"  # loopback unless opened up
    port: int = 10201
    api_key: str | None = None
    max_body_bytes: int = 25 << 20  # uploads included
    max_reference_bytes: int = 16 << 20
    clones: bool = False  # one-off clones from reference audio (the local engine loads its Base model)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"the HTTP port must be 0-65535, not {self.port}")
        if self.max_reference_bytes > self.max_body_bytes:
            raise ValueError("the reference audio limit cannot exceed the body limit")


@dataclass
class SpeechAsk:
    """A /v1/audio/speech request, checked: what to say, how to send it back."""

    body: SpeechBody
    response_format: str
    stream_format: str | None  # None: one response; "audio": raw bytes as made; "sse": events
    reference_audio: bytes | None


def _http_error(err: RequestError | WireError) -> ApiError:
    if isinstance(err, WireError):
        return ApiError(400, err.message, param=err.param)
    code = "voice_not_found" if err.code == "unknown-voice" else None
    return ApiError(400, err.message, param=err.param, code=code)


class SpeechApi:
    """Request handling; one instance per app."""

    def __init__(self, requests: SpeechRequests, options: HttpApiOptions, voices_dir: Path | None) -> None:
        self.requests = requests
        self.options = options
        self.voices_dir = voices_dir  # reference files may only come from here
        self.created = int(time.time())

    # Parsing

    async def _fields(self, request: web.Request) -> tuple[Any, bytes | None]:
        """The fields of a JSON or multipart request, and an uploaded reference file if any."""
        if not request.content_type.startswith("multipart/"):
            try:
                return await request.json(), None
            except web.HTTPException:
                raise
            except ValueError as err:
                raise ApiError(400, f"Request body is not valid JSON ({err})") from err
        fields: dict[str, Any] = {}
        upload = None
        limit = self.options.max_reference_bytes
        for name, value in (await request.post()).items():
            if not hasattr(value, "file"):
                fields[name] = value
            elif name in UPLOAD_FIELDS:
                upload = value.file.read(limit + 1)
                if len(upload) > limit:
                    raise ApiError(413, f"{name} is larger than {limit} bytes", param=name)
        return fields, upload

    async def parse(self, request: web.Request) -> SpeechAsk:
        fields, upload = await self._fields(request)
        body = SpeechBody.from_json(fields)
        if body.input is None:
            raise ApiError(400, "'input' is required", param="input")
        if not body.input.strip():
            raise ApiError(400, "'input' is empty", param="input")
        response_format = (body.response_format or "mp3").lower()
        if response_format not in FORMATS:
            raise ApiError(
                400, f"response_format '{response_format}' is not supported; use one of {', '.join(FORMATS)}", param="response_format"
            )
        if body.speed not in (None, 1.0):
            raise ApiError(400, "Only speed 1.0 is supported: Qwen3-TTS speaks at its natural pace", param="speed")
        stream_format = body.stream_format
        if stream_format not in (None, "audio", "sse"):
            raise ApiError(400, "stream_format must be 'audio' or 'sse'", param="stream_format")
        if stream_format is None and body.stream:
            stream_format = "sse"
        if stream_format is not None and response_format not in STREAMED_FORMATS:
            raise ApiError(400, "Streaming needs response_format 'pcm' or 'wav'", param="response_format")
        if body.task_type is not None and body.task_type not in TASK_TYPES:
            raise ApiError(400, f"task_type '{body.task_type}' is not served here; use {' or '.join(TASK_TYPES)}", param="task_type")
        if body.max_new_tokens is not None and body.max_new_tokens < 2:
            raise ApiError(400, "'max_new_tokens' must be at least 2", param="max_new_tokens")
        reference = upload
        if reference is None and body.ref_audio is not None:
            reference = reference_bytes(body.ref_audio, self.voices_dir, self.options.max_reference_bytes)
        return SpeechAsk(body=body, response_format=response_format, stream_format=stream_format, reference_audio=reference)

    async def voice_for(self, ask: SpeechAsk) -> Voice:
        body = ask.body
        if ask.reference_audio is not None:
            if not self.options.clones:
                raise ApiError(400, "Voice cloning is off on this server: start it with --http-clones", param="reference_audio")
            transcript = None if body.x_vector_only_mode else (body.ref_text or "").strip() or None
            return await self.requests.one_off_clone(ask.reference_audio, transcript)
        voice = self.requests.voice(body.voice)
        if body.task_type == "Base" and not voice.is_clone:
            raise ApiError(400, f"task_type Base needs reference audio or a clone voice; '{voice.name}' is a preset", param="task_type")
        if body.task_type == "CustomVoice" and voice.is_clone:
            raise ApiError(400, f"task_type CustomVoice needs a preset speaker; '{voice.name}' is a clone", param="task_type")
        return voice

    # Handlers

    async def speech(self, request: web.Request) -> web.StreamResponse:
        try:
            ask = await self.parse(request)
            voice = await self.voice_for(ask)
            options = self.requests.request_options(voice, **ask.body.request_changes())
            job = self.requests.speak(ask.body.input, voice, options)
        except (RequestError, WireError) as err:
            raise _http_error(err) from err
        chunks = job.__aiter__()
        try:
            # Headers go out with the first audio, so a failure before it is still a clean error.
            first = await anext(chunks, None)
            if ask.stream_format == "sse":
                return await self._send_sse(request, ask, first, chunks)
            if ask.response_format in STREAMED_FORMATS:
                return await self._send_stream(request, ask, first, chunks)
            audio = [] if first is None else [first.audio]
            audio += [chunk.audio async for chunk in chunks]
            clip = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
            data = await asyncio.to_thread(encode, clip, ask.response_format)
            return web.Response(body=data, content_type=CONTENT_TYPES[ask.response_format].split(";")[0])
        except (JobCancelled, ConnectionError, ApiError):
            raise
        except Exception as err:  # noqa: BLE001 - the backend failed this request
            _LOGGER.exception("Speech request failed")
            raise ApiError(500, f"Synthesis failed: {err}") from err
        finally:
            job.cancel()

    async def _send_stream(self, request, ask: SpeechAsk, first: AudioChunk | None, chunks) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[ask.response_format]})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if ask.response_format == "wav":
                await response.write(streaming_wav_header())
            if first is not None:
                await response.write(first.pcm)
                async for chunk in chunks:
                    await response.write(chunk.pcm)
        except (JobCancelled, ConnectionError):
            return self._client_left(request, response)
        except Exception:  # noqa: BLE001 - too late for an error status: cut the stream short
            _LOGGER.exception("Speech stream failed after it started")
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def _send_sse(self, request, ask: SpeechAsk, first: AudioChunk | None, chunks) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
        except ConnectionError:
            return self._client_left(request, response)
        frames = 0
        header = streaming_wav_header() if ask.response_format == "wav" else b""

        async def delta(pcm: bytes) -> None:
            await response.write(SseEvent(AUDIO_DELTA, audio=pcm, response_format=ask.response_format).to_bytes())

        try:
            if first is not None:
                frames += first.frames
                await delta(header + first.pcm)
                async for chunk in chunks:
                    frames += chunk.frames
                    await delta(chunk.pcm)
        except (JobCancelled, ConnectionError):
            return self._client_left(request, response)
        except Exception as err:  # noqa: BLE001 - report it the way the stream reports things
            _LOGGER.exception("Speech stream failed after it started")
            await response.write(SseEvent(AUDIO_ERROR, error=ApiError(500, f"Synthesis failed: {err}").body()).to_bytes())
            await response.write_eof()
            return response
        usage = {"input_tokens": 0, "output_tokens": frames * 16, "total_tokens": frames * 16}
        await response.write(SseEvent(AUDIO_DONE, usage=usage).to_bytes())
        await response.write_eof()
        return response

    @staticmethod
    def _client_left(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        # Nothing more can reach the client; the job is cancelled by the caller.
        _LOGGER.info("Client of %s %s left before the audio was complete", request.method, request.path)
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(ModelListing(ids=[MODEL_ID], created=self.created).to_json())

    async def voices(self, request: web.Request) -> web.Response:
        catalog = self.requests.catalog
        listing = VoiceListing(
            voices=catalog.names,
            data=[VoiceEntry(v.name, v.description, v.languages, v.is_clone) for v in catalog.voices],
            can_clone=self.options.clones and self.requests.backend.can_clone,
        )
        return web.json_response(listing.to_json())

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "version": __version__,
                "active_requests": self.requests.backend.active_jobs,
                "voices": len(self.requests.catalog.voices),
                "asyncio_tasks": len(asyncio.all_tasks()),  # a leak shows here first
            }
        )


def create_app(api: SpeechApi) -> web.Application:
    api_key = api.options.api_key

    @web.middleware
    async def openai_errors(request: web.Request, handler):
        try:
            if api_key and request.path.startswith("/v1/"):
                supplied = request.headers.get("Authorization", "")
                if not hmac.compare_digest(supplied.encode(), f"Bearer {api_key}".encode()):
                    raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
            return await handler(request)
        except ApiError as err:
            _LOGGER.info("Refused %s %s: %s", request.method, request.path, err.message)
            return err.response()
        except web.HTTPException as err:
            if err.status < 400:
                raise
            return from_http_exception(err).response()
        except (JobCancelled, ConnectionError):
            _LOGGER.info("Client of %s %s left before the audio was complete", request.method, request.path)
            raise

    app = web.Application(middlewares=[openai_errors], client_max_size=api.options.max_body_bytes)
    app.router.add_post("/v1/audio/speech", api.speech)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/audio/voices", api.voices)
    app.router.add_get("/health", api.health)
    return app
