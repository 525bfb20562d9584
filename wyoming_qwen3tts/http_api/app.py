"""The aiohttp app: POST /v1/audio/speech, GET /v1/models, GET /v1/audio/voices, GET /health.

Requests follow OpenAI's speech API, plus the fields vLLM-Omni adds for Qwen3-TTS (`language`,
`task_type`, `ref_audio`/`ref_text`, `x_vector_only_mode`, `stream`, `max_new_tokens`,
`non_streaming_mode`), so clients of either work here. Synthesis goes through the same engine,
queue and fairness as the Wyoming server.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from .. import __version__
from ..clone_cache import ClonePrompts
from ..engine.engine import RequestOptions, SpeechEngine
from ..engine.prompt import ClonePrompt, VoiceSpec
from ..engine.worker import JobCancelled
from ..reference_audio import ReferenceAudioError, read_reference
from ..text import split_text
from ..voices import VoiceCatalog
from .encoders import CONTENT_TYPES, FORMATS, STREAMED_FORMATS, encode, streaming_wav_header
from .errors import ApiError, from_http_exception, sse
from .reference import reference_bytes

_LOGGER = logging.getLogger(__name__)

MODEL_ID = "qwen3-tts"
TASK_TYPES = ("CustomVoice", "Base")


@dataclass(frozen=True)
class HttpApiOptions:
    """How the HTTP API listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 10201
    api_key: str | None = None
    max_body_bytes: int = 25 << 20
    max_reference_bytes: int = 16 << 20
    max_text_chars: int = 20_000
    voices_dir: Path | None = None  # reference files may only come from here


@dataclass
class SpeechRequest:
    """A parsed /v1/audio/speech request."""

    input: str
    voice: str | None
    response_format: str = "mp3"
    stream_format: str | None = None  # None: plain response ("audio" bytes for wav/pcm)
    language: str = "auto"
    instructions: str | None = None
    task_type: str | None = None
    reference_audio: bytes | None = None
    reference_text: str | None = None
    x_vector_only: bool = False
    max_new_tokens: int | None = None
    non_streaming_mode: bool | None = None


def _field(body: dict, *names: str, default=None):
    for name in names:
        if name in body and body[name] is not None:
            return body[name]
    return default


def _string(body: dict, *names: str, default: str | None = None) -> str | None:
    value = _field(body, *names, default=default)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"'{names[0]}' must be a string", param=names[0])
    return value


def _boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ApiError(400, f"'{name}' must be true or false", param=name)


class SpeechApi:
    """Request handling; one instance per app."""

    def __init__(
        self,
        engine: SpeechEngine,
        catalog: VoiceCatalog,
        options: HttpApiOptions,
        clone_prompts: ClonePrompts | None,
        request_defaults: RequestOptions = RequestOptions(),
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.options = options
        self.clone_prompts = clone_prompts
        self.request_defaults = request_defaults
        self.created = int(time.time())

    # Parsing

    async def _body(self, request: web.Request) -> tuple[dict, bytes | None]:
        """Fields of a JSON or multipart request, and an uploaded reference file if any."""
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            fields: dict[str, Any] = {}
            upload = None
            for name, value in form.items():
                if hasattr(value, "file"):
                    if name in ("reference_audio", "ref_audio", "file", "audio_sample"):
                        upload = value.file.read(self.options.max_reference_bytes + 1)
                        if len(upload) > self.options.max_reference_bytes:
                            raise ApiError(413, f"{name} is larger than {self.options.max_reference_bytes} bytes", param=name)
                else:
                    fields[name] = value
            return fields, upload
        try:
            body = await request.json()
        except web.HTTPException:
            raise
        except ValueError as err:
            raise ApiError(400, f"Request body is not valid JSON ({err})") from err
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be a JSON object")
        return body, None

    async def parse(self, request: web.Request) -> SpeechRequest:
        body, upload = await self._body(request)
        text = _string(body, "input")
        if text is None:
            raise ApiError(400, "'input' is required", param="input")
        if not text.strip():
            raise ApiError(400, "'input' is empty", param="input")
        if len(text) > self.options.max_text_chars:
            raise ApiError(
                400, f"'input' has {len(text)} characters; the limit is {self.options.max_text_chars}", param="input"
            )
        response_format = (_string(body, "response_format", default="mp3") or "mp3").lower()
        if response_format not in FORMATS:
            raise ApiError(
                400,
                f"response_format '{response_format}' is not supported; use one of {', '.join(FORMATS)}",
                param="response_format",
            )
        speed = _field(body, "speed", default=1.0)
        try:
            speed = float(speed)
        except (TypeError, ValueError):
            raise ApiError(400, "'speed' must be a number", param="speed") from None
        if speed != 1.0:
            raise ApiError(400, "Only speed 1.0 is supported: Qwen3-TTS speaks at its natural pace", param="speed")
        stream_format = _string(body, "stream_format")
        if stream_format not in (None, "audio", "sse"):
            raise ApiError(400, "stream_format must be 'audio' or 'sse'", param="stream_format")
        if stream_format is None and _boolean(_field(body, "stream", default=False), "stream"):
            stream_format = "sse"
        if stream_format is not None and response_format not in STREAMED_FORMATS:
            raise ApiError(400, "Streaming needs response_format 'pcm' or 'wav'", param="response_format")
        task_type = _string(body, "task_type")
        if task_type is not None and task_type not in TASK_TYPES:
            raise ApiError(400, f"task_type '{task_type}' is not served here; use {' or '.join(TASK_TYPES)}", param="task_type")
        max_new_tokens = _field(body, "max_new_tokens")
        if max_new_tokens is not None:
            try:
                max_new_tokens = int(max_new_tokens)
            except (TypeError, ValueError):
                raise ApiError(400, "'max_new_tokens' must be an integer", param="max_new_tokens") from None
            if max_new_tokens < 2:
                raise ApiError(400, "'max_new_tokens' must be at least 2", param="max_new_tokens")
        non_streaming_mode = _field(body, "non_streaming_mode")

        reference = upload
        reference_value = _field(body, "reference_audio", "ref_audio")
        if reference is None and reference_value is not None:
            if not isinstance(reference_value, str):
                raise ApiError(400, "'reference_audio' must be a string", param="reference_audio")
            reference = reference_bytes(reference_value, self.options.voices_dir, self.options.max_reference_bytes)
        return SpeechRequest(
            input=text,
            voice=_string(body, "voice"),
            response_format=response_format,
            stream_format=stream_format,
            language=_string(body, "language", default="auto") or "auto",
            instructions=_string(body, "instructions", "instruct"),
            task_type=task_type,
            reference_audio=reference,
            reference_text=(_string(body, "reference_text", "ref_text") or "").strip() or None,
            x_vector_only=_boolean(_field(body, "x_vector_only_mode", default=False), "x_vector_only_mode"),
            max_new_tokens=max_new_tokens,
            non_streaming_mode=None if non_streaming_mode is None else _boolean(non_streaming_mode, "non_streaming_mode"),
        )

    async def voice_for(self, speech: SpeechRequest) -> tuple[VoiceSpec, str]:
        """The voice to speak with, and the language to use."""
        language = speech.language.strip().lower() or "auto"
        if speech.reference_audio is not None:
            if self.clone_prompts is None or not self.engine.can_clone:
                raise ApiError(
                    400,
                    "Voice cloning is off on this server: start it with --http-clones (or configure a clone voice)",
                    param="reference_audio",
                )
            try:
                # Decoding and resampling take a while: keep them off the event loop.
                audio = await asyncio.to_thread(read_reference, speech.reference_audio, "reference_audio")
            except ReferenceAudioError as err:
                raise ApiError(400, str(err), param="reference_audio") from err
            transcript = None if speech.x_vector_only else speech.reference_text
            prompt, _computed = await self.clone_prompts.get(speech.reference_audio, audio, transcript)
            return prompt, language
        voice = self.catalog.find(speech.voice)
        if voice is None:
            raise ApiError(
                400,
                f"Unknown voice '{speech.voice}'. Available voices: {', '.join(self.catalog.names)}",
                param="voice",
                code="voice_not_found",
            )
        if speech.task_type == "Base" and not isinstance(voice.spec, ClonePrompt):
            raise ApiError(400, f"task_type Base needs reference audio or a clone voice; '{voice.name}' is a preset", param="task_type")
        if speech.task_type == "CustomVoice" and isinstance(voice.spec, ClonePrompt):
            raise ApiError(400, f"task_type CustomVoice needs a preset speaker; '{voice.name}' is a clone", param="task_type")
        return voice.spec, voice.language if language == "auto" else language

    # Handlers

    async def speech(self, request: web.Request) -> web.StreamResponse:
        speech = await self.parse(request)
        spec, language = await self.voice_for(speech)
        if language not in self.engine.languages:
            raise ApiError(400, f"Unknown language '{speech.language}'; use one of {', '.join(self.engine.languages)}", param="language")
        options = RequestOptions(
            language=language,
            sampling=self.request_defaults.sampling,
            seed=self.request_defaults.seed,
            non_streaming_mode=speech.non_streaming_mode if speech.non_streaming_mode is not None else self.request_defaults.non_streaming_mode,
            instruct=speech.instructions,
            max_frames=None if speech.max_new_tokens is None else speech.max_new_tokens - 1,
        )
        job = self.engine.start(spec, options)
        for segment in split_text(speech.input):
            job.add_text(segment)
        job.finish()
        chunks = job.__aiter__()
        try:
            # Headers go out with the first audio, so a failure before it is still a clean error.
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = None
            if speech.stream_format == "sse":
                return await self._send_sse(request, speech, first, chunks)
            if speech.response_format in STREAMED_FORMATS:
                return await self._send_stream(request, speech, first, chunks)
            audio = [] if first is None else [first.audio]
            audio += [chunk.audio async for chunk in chunks]
            clip = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
            body = await asyncio.to_thread(encode, clip, speech.response_format)
            return web.Response(body=body, content_type=CONTENT_TYPES[speech.response_format].split(";")[0])
        except (JobCancelled, ConnectionError):
            raise
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001 - the engine failed this request
            _LOGGER.exception("Speech request failed")
            raise ApiError(500, f"Synthesis failed: {err}") from err
        finally:
            job.cancel()

    async def _send_stream(self, request, speech: SpeechRequest, first, chunks) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[speech.response_format]})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if speech.response_format == "wav":
            await response.write(streaming_wav_header())
        try:
            if first is not None:
                await response.write(first.pcm)
                async for chunk in chunks:
                    await response.write(chunk.pcm)
        except (JobCancelled, ConnectionError):
            raise
        except Exception:  # noqa: BLE001 - too late for an error status: cut the stream short
            _LOGGER.exception("Speech stream failed after it started")
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def _send_sse(self, request, speech: SpeechRequest, first, chunks) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        frames = 0
        header = streaming_wav_header() if speech.response_format == "wav" else b""

        async def delta(pcm: bytes) -> None:
            audio = base64.b64encode(pcm).decode()
            await response.write(sse("speech.audio.delta", {"type": "speech.audio.delta", "audio": audio, "response_format": speech.response_format}))

        try:
            if first is not None:
                frames += first.frames
                await delta(header + first.pcm)
                async for chunk in chunks:
                    frames += chunk.frames
                    await delta(chunk.pcm)
        except (JobCancelled, ConnectionError):
            raise
        except Exception as err:  # noqa: BLE001 - report it the way the stream reports things
            _LOGGER.exception("Speech stream failed after it started")
            error = ApiError(500, f"Synthesis failed: {err}").body()["error"]
            await response.write(sse("speech.audio.error", {"type": "speech.audio.error", "error": error}))
            await response.write_eof()
            return response
        usage = {"input_tokens": 0, "output_tokens": frames * 16, "total_tokens": frames * 16}
        await response.write(sse("speech.audio.done", {"type": "speech.audio.done", "usage": usage}))
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": self.created, "owned_by": "qwen"}]}
        )

    async def voices(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "voices": self.catalog.names,
                "uploaded_voices": [],
                "data": [
                    {"name": v.name, "description": v.description, "languages": v.languages, "clone": isinstance(v.spec, ClonePrompt)}
                    for v in self.catalog.voices
                ],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__, "active_requests": self.engine.active_jobs})


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
