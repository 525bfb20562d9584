"""Talking to one remote speech server: voice and model listings, uploads, streamed speech.

Requests are `openai_wire.SpeechBody` in vLLM-Omni's shape for Qwen3-TTS; raw 24 kHz 16-bit PCM
(`stream_format: audio`) is read as it streams, and SSE answers are read too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp

from ..openai_wire import AUDIO_DELTA, AUDIO_ERROR, ErrorBody, ModelListing, SpeechBody, SseReader, VoiceListing
from ..speech import ReferenceClone
from .replicas import Replica

_LOGGER = logging.getLogger(__name__)

UPLOAD_CONSENT = "wyoming-qwen3tts"
# What a dropped connection, a refused connection or a timeout raise in aiohttp.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


class RemoteError(RuntimeError):
    """The remote server refused or failed the request; the message is the server's."""


class ReplicaFailed(Exception):
    """The replica itself failed (connection, timeout, 5xx): try another one."""


async def fetch_listings(session: aiohttp.ClientSession, replica: Replica, want_models: bool) -> tuple[VoiceListing, ModelListing]:
    """The replica's voices (and models); raises ReplicaFailed when it does not answer."""
    try:
        async with session.get(f"{replica.url}/v1/audio/voices") as response:
            response.raise_for_status()
            voices = VoiceListing.from_json(await response.json())
        models = ModelListing()
        if want_models:
            async with session.get(f"{replica.url}/v1/models") as response:
                response.raise_for_status()
                models = ModelListing.from_json(await response.json())
    except (*TRANSPORT_ERRORS, ValueError) as err:
        raise ReplicaFailed(f"{type(err).__name__}: {err}") from err
    return voices, models


async def upload_clone(session: aiohttp.ClientSession, replica: Replica, voice: ReferenceClone) -> None:
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
        async with session.post(f"{replica.url}/v1/audio/voices", data=form) as response:
            if response.status in (404, 405, 501):
                replica.accepts_uploads = False
                return
            if response.status >= 400:
                _LOGGER.warning("Remote %s refused the voice upload (%d); sending the sample per request", replica.url, response.status)
                return
    except TRANSPORT_ERRORS as err:
        raise ReplicaFailed(str(err)) from err
    replica.accepts_uploads = True
    replica.uploaded[voice.key] = name


async def stream_speech(session: aiohttp.ClientSession, replica: Replica, body: SpeechBody, first_byte_timeout: float) -> AsyncIterator[bytes]:
    """The PCM bytes of one request as they arrive."""
    try:
        async with asyncio.timeout(first_byte_timeout):
            response = await session.post(f"{replica.url}/v1/audio/speech", json=body.to_json())
            try:
                if response.status >= 400:
                    message = ErrorBody.from_text(await response.text(), response.status).message
                    if response.status >= 500:
                        raise ReplicaFailed(f"{response.status}: {message}")
                    raise RemoteError(message)
                first = await response.content.readany()
            except BaseException:
                response.release()
                raise
    except TRANSPORT_ERRORS as err:
        raise ReplicaFailed(f"{type(err).__name__}: {err}") from err
    complete = False
    try:
        sse = response.content_type == "text/event-stream"
        async for pcm in _sse_audio(response, first) if sse else _raw(response, first):
            yield pcm
        complete = True
    except TRANSPORT_ERRORS as err:
        raise ReplicaFailed(f"{type(err).__name__}: {err}") from err
    finally:
        if complete:
            response.release()
        else:  # an abandoned stream drops its connection, so the server stops generating
            response.close()


async def _raw(response: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for data in response.content.iter_any():
        yield data


async def _sse_audio(response: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
    reader = SseReader()
    async for data in _raw(response, first):
        for event in reader.feed(data):
            if event.type == AUDIO_DELTA and event.audio:
                yield event.audio
            elif event.type == AUDIO_ERROR:
                raise RemoteError(event.error.message if event.error else "the remote reported an error")
