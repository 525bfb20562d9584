"""The OpenAI-compatible speech API on the wire: request body, SSE events, errors, voice list.

The HTTP app writes and reads these; the remote engine writes requests and reads answers with
the same classes, so a field is named in one place. The request follows OpenAI's speech API
plus the fields vLLM-Omni adds for Qwen3-TTS (`language`, `task_type`, `ref_audio`/`ref_text`,
`x_vector_only_mode`, `stream`, `stream_format`, `max_new_tokens`, `non_streaming_mode`).
Parsing checks types only; what a value means is the server's business.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .speech import RequestOptions

# SSE event types, as vLLM-Omni names them.
AUDIO_DELTA = "speech.audio.delta"
AUDIO_DONE = "speech.audio.done"
AUDIO_ERROR = "speech.audio.error"


class WireError(ValueError):
    """A body that does not have the shape the API defines; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _string(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise WireError(f"'{name}' must be a string", name)
    return value


def _boolean(value: Any, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):  # multipart forms
        return value.lower() in ("true", "1")
    raise WireError(f"'{name}' must be true or false", name)


def _number(value: Any, name: str, kind: type) -> Any:
    if value is None:
        return None
    if isinstance(value, bool):
        raise WireError(f"'{name}' must be a number", name)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise WireError(f"'{name}' must be {'an integer' if kind is int else 'a number'}", name) from None
    if kind is int and isinstance(value, float) and value != number:
        raise WireError(f"'{name}' must be an integer", name)
    return number


def _without_none(data: dict) -> dict:
    return {key: value for key, value in data.items() if value is not None}


@dataclass
class SpeechBody:
    """POST /v1/audio/speech."""

    input: str | None = None
    model: str | None = None
    voice: str | None = None
    response_format: str | None = None  # None: the server's default (mp3, as OpenAI)
    speed: float | None = None
    instructions: str | None = None
    stream: bool | None = None
    stream_format: str | None = None  # "audio" (raw bytes) or "sse"
    language: str | None = None
    task_type: str | None = None  # "CustomVoice" or "Base"
    ref_audio: str | None = None  # base64, a data URI, or a file in the server's voices folder
    ref_text: str | None = None
    x_vector_only_mode: bool | None = None
    max_new_tokens: int | None = None
    non_streaming_mode: bool | None = None

    # Other spellings clients use for the same fields.
    ALIASES = {"reference_audio": "ref_audio", "reference_text": "ref_text", "instruct": "instructions"}

    def to_json(self) -> dict:
        return _without_none(asdict(self))

    @classmethod
    def for_request(cls, text: str, options: RequestOptions, **fields: Any) -> "SpeechBody":
        """The body that asks a server for ``text`` with ``options`` (what `request_changes` reads)."""
        language = options.language or "auto"
        return cls(
            input=text,
            language="Auto" if language == "auto" else language.capitalize(),
            instructions=options.instruct or None,
            max_new_tokens=None if options.max_frames is None else options.max_frames + 1,
            non_streaming_mode=options.non_streaming_mode,
            **fields,
        )

    def request_changes(self) -> dict[str, Any]:
        """The `RequestOptions` fields this body sets (None: not set)."""
        return {
            "language": self.language,
            "instruct": self.instructions,
            "max_frames": None if self.max_new_tokens is None else self.max_new_tokens - 1,
            "non_streaming_mode": self.non_streaming_mode,
        }

    @classmethod
    def from_json(cls, data: Any) -> "SpeechBody":
        if not isinstance(data, dict):
            raise WireError("Request body must be a JSON object")
        data = {cls.ALIASES.get(key, key): value for key, value in data.items() if value is not None}
        strings = ("input", "model", "voice", "response_format", "instructions", "stream_format", "language", "task_type", "ref_audio", "ref_text")
        return cls(
            **{name: _string(data.get(name), name) for name in strings},
            speed=_number(data.get("speed"), "speed", float),
            stream=_boolean(data.get("stream"), "stream"),
            x_vector_only_mode=_boolean(data.get("x_vector_only_mode"), "x_vector_only_mode"),
            max_new_tokens=_number(data.get("max_new_tokens"), "max_new_tokens", int),
            non_streaming_mode=_boolean(data.get("non_streaming_mode"), "non_streaming_mode"),
        )


@dataclass
class ErrorBody:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def to_json(self) -> dict:
        return {"error": asdict(self)}

    @classmethod
    def from_json(cls, data: Any, status: int = 0) -> "ErrorBody":
        """Whatever a server sent as an error, as well as it can be read."""
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and error.get("message"):
            names = {f.name for f in fields(cls)}
            return cls(**{k: (str(v) if v is not None else None) for k, v in error.items() if k in names})
        if isinstance(error, str):
            return cls(message=error)
        return cls(message=f"HTTP {status}: {json.dumps(data)[:200]}")

    @classmethod
    def from_text(cls, text: str, status: int) -> "ErrorBody":
        try:
            return cls.from_json(json.loads(text), status)
        except ValueError:
            return cls(message=f"HTTP {status}: {text[:200]}")


@dataclass
class SseEvent:
    """One server-sent event of a streamed speech response."""

    type: str
    audio: bytes | None = None  # AUDIO_DELTA: the audio bytes (in the response format)
    response_format: str | None = None
    usage: dict | None = None  # AUDIO_DONE
    error: ErrorBody | None = None  # AUDIO_ERROR

    def to_json(self) -> dict:
        data: dict[str, Any] = {"type": self.type}
        if self.audio is not None:
            data["audio"] = base64.b64encode(self.audio).decode()
        if self.response_format is not None:
            data["response_format"] = self.response_format
        if self.usage is not None:
            data["usage"] = self.usage
        if self.error is not None:
            data["error"] = asdict(self.error)
        return data

    def to_bytes(self) -> bytes:
        return f"event: {self.type}\ndata: {json.dumps(self.to_json())}\n\n".encode()

    @classmethod
    def from_json(cls, data: Any) -> "SseEvent":
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise WireError("an SSE event must be an object with a 'type'")
        audio = data.get("audio")
        error = data.get("error")
        return cls(
            type=data["type"],
            audio=None if audio is None else base64.b64decode(audio),
            response_format=data.get("response_format"),
            usage=data.get("usage"),
            error=None if error is None else ErrorBody.from_json({"error": error}),
        )


class SseReader:
    """Splits a byte stream of server-sent events into `SseEvent`s."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[SseEvent]:
        self._buffer += data.replace(b"\r\n", b"\n")
        events = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            payload = b"\n".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:"))
            if payload:
                events.append(SseEvent.from_json(json.loads(payload)))
        return events


@dataclass
class VoiceEntry:
    name: str
    description: str = ""
    languages: list[str] = field(default_factory=list)
    clone: bool = False


@dataclass
class VoiceListing:
    """GET /v1/audio/voices: vLLM-Omni's `voices` and `uploaded_voices`, and our `data` and `can_clone`."""

    voices: list[str] = field(default_factory=list)
    uploaded_voices: list[dict] = field(default_factory=list)
    data: list[VoiceEntry] = field(default_factory=list)
    can_clone: bool | None = None  # None: the server does not say (vLLM-Omni)

    def to_json(self) -> dict:
        return _without_none(asdict(self))

    @classmethod
    def from_json(cls, data: Any) -> "VoiceListing":
        if not isinstance(data, dict):
            raise WireError("a voice listing must be a JSON object")
        entries = [
            VoiceEntry(name=d["name"], description=str(d.get("description") or ""), languages=list(d.get("languages") or []), clone=bool(d.get("clone")))
            for d in data.get("data") or []
            if isinstance(d, dict) and isinstance(d.get("name"), str)
        ]
        return cls(
            voices=[name for name in data.get("voices") or [] if isinstance(name, str) and name],
            uploaded_voices=[v for v in data.get("uploaded_voices") or [] if isinstance(v, dict)],
            data=entries,
            can_clone=data.get("can_clone") if isinstance(data.get("can_clone"), bool) else None,
        )

    @property
    def clone_names(self) -> set[str]:
        return {v.get("name") for v in self.uploaded_voices} | {entry.name for entry in self.data if entry.clone}


@dataclass
class ModelListing:
    """GET /v1/models."""

    ids: list[str] = field(default_factory=list)
    created: int = 0

    def to_json(self) -> dict:
        return {"object": "list", "data": [{"id": i, "object": "model", "created": self.created, "owned_by": "qwen"} for i in self.ids]}

    @classmethod
    def from_json(cls, data: Any) -> "ModelListing":
        entries = data.get("data") if isinstance(data, dict) else None
        return cls(ids=[d["id"] for d in entries or [] if isinstance(d, dict) and isinstance(d.get("id"), str)])
