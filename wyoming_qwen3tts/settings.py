"""One typed settings object for the server, from command-line flags or environment variables.

Every flag can also be given as an environment variable (for Docker): `--clone-model X` is
`QWEN3TTS_CLONE_MODEL=X`, a switch like `--no-streaming` is `QWEN3TTS_NO_STREAMING=1`. A flag
on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .engine.decode import ChunkSchedule
from .engine.engine import EngineOptions, RequestOptions
from .engine.generate import StopRules
from .engine.loader import ATTENTIONS, DEVICES, DTYPES, LoadOptions
from .remote.engine import RemoteOptions
from .server.events import EventLimits

ENV_PREFIX = "QWEN3TTS_"
DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
DEFAULT_CLONE_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"
DEFAULT_ZEROCONF_NAME = "qwen3-tts"
TRUE_WORDS = ("1", "true", "yes", "on")
LOG_LEVELS = ("debug", "info", "warning", "error")
# --text-mode -> the package's non_streaming_mode
TEXT_MODES = {"auto": None, "upfront": True, "dual-track": False}


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start."""

    uri: str = "tcp://0.0.0.0:10200"
    zeroconf_name: str | None = None  # None: no zeroconf announcement
    zeroconf_host: str | None = None  # address to announce; None: this host's LAN address
    data_dir: Path = Path("data")
    model: str = DEFAULT_MODEL
    clone_model: str = DEFAULT_CLONE_MODEL
    load: LoadOptions = field(default_factory=LoadOptions)
    default_voice: str | None = None
    voices_file: Path | None = None  # YAML with clone voices
    voices_dir: Path | None = None  # where relative sample paths point; default: the file's folder
    streaming: bool = True
    stream_text_by: str = "words"  # "words": dual-track streaming; "sentences": sentence by sentence
    max_text_chars: int = 20_000
    first_chunk_frames: int = 1
    stop: StopRules = field(default_factory=StopRules)
    request: RequestOptions = field(default_factory=RequestOptions)
    limits: EventLimits = field(default_factory=EventLimits)
    log_level: str = "info"
    http_port: int | None = None  # None: no HTTP API
    http_host: str = "127.0.0.1"
    http_api_key: str | None = None
    http_clones: bool = False  # load the Base model for one-off clones over HTTP
    http_max_body_bytes: int = 25 << 20  # uploads included
    remote: RemoteOptions | None = None  # set: speech comes from remote servers, no local model

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def clone_cache_dir(self) -> Path:
        return self.data_dir / "clone-prompts"

    @property
    def samples_dir(self) -> Path:
        if self.voices_dir is not None:
            return self.voices_dir
        if self.voices_file is not None:
            return self.voices_file.parent
        return self.data_dir / "voices"

    def engine_options(self, with_clone_model: bool) -> EngineOptions:
        return EngineOptions(
            model=self.model,
            clone_model=self.clone_model if with_clone_model else None,
            models_dir=self.models_dir,
            compile_cache_dir=self.data_dir / "compile-cache",
            load=self.load,
            stop=self.stop,
            chunks=ChunkSchedule(first_frames=self.first_chunk_frames, max_frames=max(12, self.first_chunk_frames)),
        )

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        try:
            parser = build_parser(environ)
        except ValueError as err:  # a malformed number in the environment
            raise SystemExit(f"Bad environment setting: {err}") from err
        args = parser.parse_args(argv)
        try:
            return cls._from_namespace(args)
        except ValueError as err:
            parser.error(str(err))

    @classmethod
    def _from_namespace(cls, args: argparse.Namespace) -> "Settings":
        if args.first_chunk_frames < 1 or args.max_text_length < 1:
            raise ValueError("--first-chunk-frames and --max-text-length must be at least 1")
        if not 0 <= args.http_port <= 65535:
            raise ValueError("--http-port must be a port number (0 turns the HTTP API off)")
        return cls(
            uri=args.uri,
            zeroconf_name=args.zeroconf or None,
            zeroconf_host=args.zeroconf_host or None,
            data_dir=Path(args.data_dir),
            model=args.model,
            clone_model=args.clone_model,
            load=LoadOptions(
                device=args.device,
                dtype=args.dtype,
                attention=args.attention,
                text_embedding_on_cpu=args.text_embedding_on_cpu,
                compile=args.compile,
                threads=args.threads,
            ),
            default_voice=args.voice or None,
            voices_file=Path(args.voices) if args.voices else None,
            voices_dir=Path(args.voices_dir) if args.voices_dir else None,
            streaming=not args.no_streaming,
            stream_text_by=args.stream_text_by,
            request=RequestOptions(non_streaming_mode=TEXT_MODES[args.text_mode]),
            max_text_chars=args.max_text_length,
            first_chunk_frames=args.first_chunk_frames,
            log_level="debug" if args.debug else args.log_level,
            http_port=args.http_port or None,
            http_host=args.http_host,
            http_api_key=args.http_api_key or None,
            http_clones=args.http_clones,
            remote=cls._remote(args),
        )

    @staticmethod
    def _remote(args: argparse.Namespace) -> RemoteOptions | None:
        if args.engine == "local":
            return None
        urls = tuple(url.strip() for value in args.remote_url or [] for url in value.split(",") if url.strip())
        if not urls:
            raise ValueError("--engine remote needs at least one --remote-url")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--remote-url {url!r} must start with http:// or https://")
        return RemoteOptions(
            urls=urls,
            api_key=args.remote_api_key or None,
            model=args.remote_model or None,
            connect_timeout=args.remote_connect_timeout,
            first_byte_timeout=args.remote_first_byte_timeout,
        )


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wyoming_qwen3tts",
        description="Wyoming text-to-speech server for Qwen3-TTS. Every flag can also be set "
        f"as an environment variable: {ENV_PREFIX}<FLAG>, e.g. {_env_name('--clone-model')}.",
    )

    def option(flag: str, default=None, **kwargs) -> None:
        value = environ.get(_env_name(flag))
        if value is not None and value != "":
            default = kwargs["type"](value) if "type" in kwargs else value
        parser.add_argument(flag, default=default, **kwargs)

    def switch(flag: str, help: str) -> None:
        default = environ.get(_env_name(flag), "").strip().lower() in TRUE_WORDS
        parser.add_argument(flag, action="store_true", default=default, help=help)

    option("--uri", "tcp://0.0.0.0:10200", help="where to listen: tcp://HOST:PORT or unix://PATH")
    zeroconf = environ.get(_env_name("--zeroconf")) or None
    parser.add_argument(
        "--zeroconf",
        nargs="?",
        const=DEFAULT_ZEROCONF_NAME,
        default=zeroconf,
        metavar="NAME",
        help=f"announce the server by zeroconf, under NAME (default: {DEFAULT_ZEROCONF_NAME})",
    )
    option("--zeroconf-host", help="address to announce (default: this host's LAN address)")
    option("--engine", "local", choices=("local", "remote"), help="local: run the model here; remote: use OpenAI-compatible speech servers (vLLM-Omni)")
    remote_urls = environ.get(_env_name("--remote-url"))
    parser.add_argument(
        "--remote-url",
        action="append",
        default=[remote_urls] if remote_urls else None,
        help="base URL of a remote speech server, e.g. http://gpu-box:8091 (repeat for replicas; the environment variable takes a comma-separated list)",
    )
    option("--remote-api-key", help="API key for the remote servers")
    option("--remote-model", help="model name to send to the remote servers (default: the first they list)")
    option("--remote-connect-timeout", 5.0, type=float, help="seconds to connect to a remote server")
    option("--remote-first-byte-timeout", 60.0, type=float, help="seconds to wait for a remote server's first audio")
    option("--model", DEFAULT_MODEL, help="CustomVoice checkpoint: Hugging Face id or local folder")
    option("--clone-model", DEFAULT_CLONE_MODEL, help="Base checkpoint for voice clones (loaded only when clones are configured)")
    option("--device", "auto", choices=DEVICES, help="auto = CUDA when available, else CPU")
    option("--dtype", "auto", choices=DTYPES, help="auto = bfloat16 on CUDA, float32 on CPU")
    option("--attention", "auto", choices=ATTENTIONS, help="auto = FlashAttention 2 when usable, else sdpa")
    switch(
        "--text-embedding-on-cpu",
        "keep the text embedding (311 M parameters at 0.6B) in CPU memory: frees about 0.6 GB of GPU memory per model",
    )
    option("--threads", 0, type=int, help="PyTorch CPU threads (0 = all cores but one)")
    switch(
        "--compile",
        "compile the code predictor's frame loop with torch.compile (CUDA graphs on a GPU); takes a minute at start-up, falls back to uncompiled on failure",
    )
    option("--data-dir", "data", help="folder for downloaded models and caches")
    option("--voice", help="default voice when a request names none (default: the first preset speaker)")
    option("--voices", help="YAML file of clone voices: a list of {name, audio, transcript, language}")
    option("--voices-dir", help="folder that relative sample paths point into (default: the voices file's folder)")
    switch("--no-streaming", "do not advertise streaming synthesis (synthesize-start/chunk/stop)")
    option(
        "--stream-text-by",
        "words",
        choices=("words", "sentences"),
        help="streamed text enters the model word by word (dual track: speech starts after the first "
        "words) or sentence by sentence",
    )
    option(
        "--text-mode",
        "auto",
        choices=tuple(TEXT_MODES),
        help="how a whole sentence enters the prompt: up front, or dual track; auto = the package's "
        "default (up front for preset speakers, dual track for clones)",
    )
    option("--max-text-length", 20_000, type=int, help="most characters one request may ask to speak")
    option("--first-chunk-frames", 1, type=int, help="80 ms frames in the first audio chunk (1-2 starts audio soonest)")
    option("--http-port", 0, type=int, help="serve the OpenAI-compatible /v1/audio/speech API on this port (0: off)")
    option("--http-host", "127.0.0.1", help="address the HTTP API binds to (loopback unless you open it up)")
    option("--http-api-key", help="require 'Authorization: Bearer KEY' on the HTTP API")
    switch("--http-clones", "load the Base model so HTTP requests can clone a voice from reference audio")
    option("--log-level", "info", choices=LOG_LEVELS, help="how much to log")
    switch("--debug", "log DEBUG messages (same as --log-level debug)")
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The package's config classes log every default they fill in.
    logging.getLogger("qwen_tts").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("transformers").setLevel(max(logging.WARNING, logging.getLogger().level))
