"""The program's settings: each layer's own typed options, from command-line flags or the environment.

Every flag can also be given as an environment variable (for Docker): `--clone-model X` is
`QWEN3TTS_CLONE_MODEL=X`, a switch like `--no-streaming` is `QWEN3TTS_NO_STREAMING=1`. A flag
on the command line wins over the environment. Defaults are the option classes' own; each
class checks its values when it is built, and a bad one ends the program with its message.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .engine.options import (
    ATTENTIONS,
    BATCH_ATTENTION,
    CODEC_PRECISIONS,
    DEFAULT_CLONE_MODEL,
    DEVICES,
    DTYPES,
    QUANTIZE,
    ChunkSchedule,
    EngineOptions,
    LoadOptions,
)
from .http_api.app import HttpApiOptions
from .remote.engine import RemoteOptions
from .request import STREAM_TEXT_BY, RequestLayerOptions
from .server.app import DEFAULT_ZEROCONF_NAME, WyomingOptions
from .speech import RequestOptions
from .voices import VoiceOptions

ENV_PREFIX = "QWEN3TTS_"
TRUE_WORDS = ("1", "true", "yes", "on")
LOG_LEVELS = ("debug", "info", "warning", "error")
# --text-mode -> the package's non_streaming_mode
TEXT_MODES = {"auto": None, "upfront": True, "dual-track": False}


@dataclass(frozen=True)
class Settings:
    """Everything the program needs to start, one part per layer."""

    wyoming: WyomingOptions = field(default_factory=WyomingOptions)
    requests: RequestLayerOptions = field(default_factory=RequestLayerOptions)
    voices: VoiceOptions = field(default_factory=VoiceOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)  # the local engine, unless remote is set
    remote: RemoteOptions | None = None  # set: speech comes from remote servers, no local model
    http: HttpApiOptions | None = None  # None: no HTTP API
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")

    @property
    def data_dir(self) -> Path:
        return self.engine.data_dir

    @property
    def samples_dir(self) -> Path:
        """Where relative clone sample paths (and HTTP reference files) point."""
        return self.voices.samples_dir or self.data_dir / "voices"

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        try:
            parser = build_parser(environ)
        except ValueError as err:  # a malformed number in the environment
            raise SystemExit(f"Bad environment setting: {err}") from err
        args = parser.parse_args(argv)
        try:
            return from_namespace(args)
        except ValueError as err:
            parser.error(str(err))


def from_namespace(args: argparse.Namespace) -> Settings:
    """Each layer's options from parsed flags; raises ValueError with the first bad value."""
    remote = None
    if args.engine == "remote":
        urls = tuple(url.strip() for value in args.remote_url or [] for url in value.split(",") if url.strip())
        if not urls:
            raise ValueError("--engine remote needs at least one --remote-url")
        remote = RemoteOptions(
            urls=urls,
            api_key=args.remote_api_key or None,
            model=args.remote_model or None,
            connect_timeout=args.remote_connect_timeout,
            first_byte_timeout=args.remote_first_byte_timeout,
        )
    http = None
    if args.http_port:
        http = HttpApiOptions(host=args.http_host, port=args.http_port, api_key=args.http_api_key or None, clones=args.http_clones)
    return Settings(
        wyoming=WyomingOptions(
            uri=args.uri,
            zeroconf_name=args.zeroconf or None,
            zeroconf_host=args.zeroconf_host or None,
            streaming=not args.no_streaming,
            supervisor_url=args.supervisor_discovery or None,
        ),
        requests=RequestLayerOptions(
            max_text_chars=args.max_text_length,
            stream_text_by=args.stream_text_by,
            defaults=RequestOptions(non_streaming_mode=TEXT_MODES[args.text_mode]),
        ),
        voices=VoiceOptions(
            default_voice=args.voice or None,
            voices_file=Path(args.voices) if args.voices else None,
            voices_dir=Path(args.voices_dir) if args.voices_dir else None,
        ),
        engine=EngineOptions(
            model=args.model,
            clone_model=args.clone_model,
            data_dir=Path(args.data_dir),
            load=LoadOptions(
                device=args.device,
                dtype=args.dtype,
                attention=args.attention,
                text_embedding_on_cpu=args.text_embedding_on_cpu,
                compile=args.compile,
                cuda_graphs=not args.no_cuda_graphs,
                threads=args.threads,
                codec_threads=args.codec_threads,
                quantize=args.quantize,
                codec_precision=args.codec_precision,
            ),
            chunks=ChunkSchedule.starting_with(args.first_chunk_frames),
            max_batch=args.max_batch,
            codec_process=args.codec_process,
            batch_attention=args.batch_attention,
        ),
        remote=remote,
        http=http,
        log_level="debug" if args.debug else args.log_level,
    )


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wyoming_qwen3tts",
        description="Wyoming text-to-speech server for Qwen3-TTS. Every flag can also be set "
        f"as an environment variable: {ENV_PREFIX}<FLAG>, e.g. {env_name('--clone-model')}.",
    )

    def option(flag: str, default=None, **kwargs) -> None:
        value = environ.get(env_name(flag))
        if value is not None and value != "":
            default = kwargs["type"](value) if "type" in kwargs else value
        parser.add_argument(flag, default=default, **kwargs)

    def switch(flag: str, help: str) -> None:
        default = environ.get(env_name(flag), "").strip().lower() in TRUE_WORDS
        parser.add_argument(flag, action="store_true", default=default, help=help)

    wyoming, load, engine, requests = WyomingOptions, LoadOptions, EngineOptions, RequestLayerOptions
    option("--uri", wyoming.uri, help="where to listen: tcp://HOST:PORT or unix://PATH")
    parser.add_argument(
        "--zeroconf",
        nargs="?",
        const=DEFAULT_ZEROCONF_NAME,
        default=environ.get(env_name("--zeroconf")) or None,
        metavar="NAME",
        help=f"announce the server by zeroconf, under NAME (default: {DEFAULT_ZEROCONF_NAME})",
    )
    option("--zeroconf-host", help="address to announce (default: this host's LAN address)")
    option(
        "--supervisor-discovery",
        metavar="URL",
        help="tell Home Assistant's Supervisor at URL where this server is (set by the add-on)",
    )
    option("--engine", "local", choices=("local", "remote"), help="local: run the model here; remote: use OpenAI-compatible speech servers (vLLM-Omni)")
    remote_urls = environ.get(env_name("--remote-url"))
    parser.add_argument(
        "--remote-url",
        action="append",
        default=[remote_urls] if remote_urls else None,
        help="base URL of a remote speech server, e.g. http://gpu-box:8091 or http://gpu-box:8091/v1 (repeat for replicas; the environment variable takes a comma-separated list)",
    )
    option("--remote-api-key", help="API key for the remote servers")
    option("--remote-model", help="model name to send to the remote servers (default: the first they list)")
    option("--remote-connect-timeout", RemoteOptions.connect_timeout, type=float, help="seconds to connect to a remote server")
    option("--remote-first-byte-timeout", RemoteOptions.first_byte_timeout, type=float, help="seconds to wait for a remote server's first audio")
    option("--model", engine.model, help="CustomVoice checkpoint: Hugging Face id or local folder")
    option("--clone-model", DEFAULT_CLONE_MODEL, help="Base checkpoint for voice clones (loaded only when clones are configured)")
    option("--device", load.device, choices=DEVICES, help="auto = CUDA when available, else CPU")
    option("--dtype", load.dtype, choices=DTYPES, help="auto = bfloat16 on CUDA, float32 on CPU")
    option("--attention", load.attention, choices=ATTENTIONS, help="auto = FlashAttention 2 when usable, else sdpa")
    switch(
        "--text-embedding-on-cpu",
        "keep the text embedding (311 M parameters at 0.6B) in CPU memory: frees about 0.6 GB of GPU memory per model",
    )
    option("--threads", load.threads, type=int, help="PyTorch CPU threads (0 = all cores but one)")
    option(
        "--codec-threads",
        load.codec_threads,
        type=int,
        help="PyTorch CPU threads of each audio-decoding thread (0 = the cores the model leaves, at least one)",
    )
    option(
        "--quantize",
        load.quantize,
        choices=QUANTIZE,
        help="talker and code predictor weights: int8 or int4 read fewer bytes per frame on a CPU; auto = int8 on a CPU, none on a GPU",
    )
    option(
        "--codec-precision",
        load.codec_precision,
        choices=CODEC_PRECISIONS,
        help="number format of the audio codec's decoder: bfloat16 decodes about 1.8x faster on a CPU with bfloat16 "
        "arithmetic (AVX512_BF16 or AMX), in the package's GPU numbers; auto = float32 on a CPU, the model's dtype on a GPU",
    )
    switch(
        "--compile",
        "compile the code predictor's frame loop with torch.compile (CUDA graphs on a GPU); takes minutes at the first start (cached for later ones), falls back to uncompiled on failure",
    )
    switch(
        "--no-cuda-graphs",
        "on a GPU, run the code predictor's frame loop without recording it as CUDA graphs (recorded by default, unless --compile)",
    )
    option(
        "--max-batch",
        engine.max_batch,
        type=int,
        help="most streams that share one model step (0 = what suits the device: 8 on a CPU, 16 on a GPU)",
    )
    option(
        "--batch-attention",
        engine.batch_attention,
        choices=BATCH_ATTENTION,
        help="how streams sharing a step attend to their histories: rows (one call per stream), padded (one "
        "masked call for all); auto = padded on a GPU, rows on a CPU",
    )
    switch(
        "--codec-process",
        "decode audio in a process of its own, out of the way of the model's Python: more streams per second "
        "where both spend their time in Python (a GPU), for about 0.5 GB more memory",
    )
    option("--data-dir", str(engine.data_dir), help="folder for downloaded models and caches")
    option("--voice", help="default voice when a request names none (default: the first preset speaker)")
    option("--voices", help="YAML file of clone voices: a list of {name, audio, transcript, language}")
    option("--voices-dir", help="folder that relative sample paths point into (default: the voices file's folder)")
    switch("--no-streaming", "do not advertise streaming synthesis (synthesize-start/chunk/stop)")
    option(
        "--stream-text-by",
        requests.stream_text_by,
        choices=STREAM_TEXT_BY,
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
    option("--max-text-length", requests.max_text_chars, type=int, help="most characters one request may ask to speak")
    option("--first-chunk-frames", ChunkSchedule.first_frames, type=int, help="80 ms frames in the first audio chunk (1-2 starts audio soonest)")
    option("--http-port", 0, type=int, help="serve the OpenAI-compatible /v1/audio/speech API on this port (0: off)")
    option("--http-host", HttpApiOptions.host, help="address the HTTP API binds to (loopback unless you open it up)")
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
