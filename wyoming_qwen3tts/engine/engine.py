"""The speech engine: owns the loaded models and streams speech for asyncio callers."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from dataclasses import replace
from typing import AsyncIterator, Iterable

import numpy as np
import torch

from ..speech import AudioChunk, ClonePrompt, CloneSource, PresetSpeaker, RequestOptions, VoiceSpec
from .clone_cache import ClonePromptCache, checkpoint_identity, prompt_key
from .codec_process import CodecProcess, CodecProcessError
from .allocator import ADVICE, memory_allocator
from .huge_pages import move_weights_to_huge_pages
from .loader import codec_threads, load_model, parameter_bytes, resolve_checkpoint, resolve_placement, usable_cores
from .options import CPU_DECODE_FRAMES, CPU_DECODE_THREADS, EngineOptions, LoadOptions
from .prompt import DualTrackPrompt, build_prompt, resolve_language
from .runtime import ModelRuntime
from .text_feed import TextFeed
from .utterance import Utterance
from .job import SynthesisJob
from .worker import EngineWorker

_LOGGER = logging.getLogger(__name__)

CUSTOM_VOICE = "custom_voice"
BASE = "base"


def codecs_identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two speech tokenizers hold exactly the same weights."""
    state_a, state_b = a.state_dict(), b.state_dict()
    if state_a.keys() != state_b.keys():
        return False
    return all(
        state_a[k].shape == state_b[k].shape and torch.equal(state_a[k].to(state_b[k].device), state_b[k])
        for k in state_a
    )


class SpeechEngine:
    """Owns the CustomVoice model (and optionally a Base model for clones) and one worker."""

    def __init__(self, runtimes: dict[str, ModelRuntime], options: EngineOptions) -> None:
        if not runtimes:
            raise ValueError("an engine needs at least one model")
        self.runtimes = runtimes
        self.options = options
        device = next(iter(runtimes.values())).frames.device
        cpu = device.type == "cpu"
        self.worker = EngineWorker(
            max_batch=options.batch_size(device.type),
            decode_frames=CPU_DECODE_FRAMES if cpu else None,
            decode_threads=CPU_DECODE_THREADS if cpu else 1,
            idle_codec_threads=usable_cores() if cpu else None,
            codec_threads=codec_threads(options.load, torch.get_num_threads()) if cpu else None,
        )
        try:
            for runtime in runtimes.values():
                # On the model thread, which steps the model: see `ModelRuntime.warm_up`.
                self.worker.submit(functools.partial(runtime.warm_up, max_rows=self.worker.max_batch)).result()
        except BaseException:
            self.worker.stop()
            raise
        self.clone_cache = ClonePromptCache(options.clone_cache_dir)
        self._clone_identity: str | None = None
        self.clones_computed = 0  # clone prompts computed (not found in the cache) since start

    @classmethod
    def load(cls, options: EngineOptions) -> "SpeechEngine":
        """Load the configured checkpoints (blocking: minutes for a first download)."""
        placement = resolve_placement(options.load)
        torch.set_num_threads(placement.threads)
        max_batch = options.batch_size(placement.device.type)
        _LOGGER.info("PyTorch uses %d CPU thread(s); up to %d streams share a step", placement.threads, max_batch)
        if placement.device.type == "cpu":
            allocator = memory_allocator()
            if allocator == "the C library's":
                _LOGGER.info("Memory allocator: the C library's; %s", ADVICE)
            else:
                _LOGGER.info("Memory allocator: %s", allocator)
        if options.load.compile:
            # The inductor reads its cache location from the environment only.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(options.compile_cache_dir))
        runtimes: dict[str, ModelRuntime] = {}
        # Started first: the child imports PyTorch and the package while the model loads here.
        codec_process = cls._codec_process(placement, options.load) if options.codec_process else None
        try:
            cls._load_models(options, placement, runtimes, codec_process)
            if placement.device.type == "cpu":
                move_weights_to_huge_pages()
            return cls(runtimes, options)
        except BaseException:
            cls._close_decoders(runtimes)
            if codec_process is not None:
                codec_process.close()
            raise

    @staticmethod
    def _codec_process(placement, load: LoadOptions) -> CodecProcess:
        cpu = placement.device.type == "cpu"
        # One pipe for each thread that decodes: the decode threads and the model thread (first chunks).
        threads = codec_threads(load, placement.threads) if cpu else placement.threads
        return CodecProcess(channels=(CPU_DECODE_THREADS if cpu else 1) + 1, threads=threads)

    @staticmethod
    def _load_models(options: EngineOptions, placement, runtimes: dict, codec_process) -> None:
        for role, name in ((CUSTOM_VOICE, options.model), (BASE, options.clone_model)):
            if not name:
                continue
            folder = resolve_checkpoint(name, options.models_dir, role="model" if role == CUSTOM_VOICE else "clone model")
            wrapper = load_model(folder, placement, options.load.text_embedding_on_cpu)
            kind = wrapper.model.tts_model_type
            if kind != role:
                raise ValueError(f"{name} is a {kind} checkpoint, but the {role} model is expected here")
            decoder = None
            shares_codec = False
            if role == BASE and CUSTOM_VOICE in runtimes:
                shared = runtimes[CUSTOM_VOICE]
                if codecs_identical(shared.wrapper.model.speech_tokenizer.model, wrapper.model.speech_tokenizer.model):
                    wrapper.model.load_speech_tokenizer(shared.wrapper.model.speech_tokenizer)
                    decoder, shares_codec = shared.decoder, True
                    _LOGGER.info("Both checkpoints have the same speech tokenizer: one copy serves both")
            if decoder is None and codec_process is not None:
                process = codec_process if not runtimes else SpeechEngine._codec_process(placement, options.load)
                try:
                    decoder = process.attach(wrapper.model.speech_tokenizer.model.decoder)
                except CodecProcessError as err:
                    # Where audio decodes changes speed, never speech: serve on with decode threads.
                    _LOGGER.warning("Decoding audio on threads of this process instead: %s", err)
                    process.close()
            runtimes[role] = ModelRuntime.create(
                wrapper,
                decoder,
                folder,
                compile=options.load.compile,
                padded_attention=options.padded_attention(placement.device.type),
                cuda_graphs=options.load.cuda_graphs,
            )
            _LOGGER.info(
                "Loaded %s (%s) on %s as %s: %.0f MiB of model weights, %.0f MiB of codec%s",
                name,
                kind,
                placement.device,
                str(placement.dtype).removeprefix("torch."),
                parameter_bytes(wrapper.model) / 2**20,
                0 if shares_codec else parameter_bytes(wrapper.model.speech_tokenizer.model) / 2**20,
                " (shared)" if shares_codec else "",
            )
            if placement.device.type == "cuda":
                _LOGGER.info("GPU memory in use: %.0f MiB", torch.cuda.memory_allocated(placement.device) / 2**20)

    def close(self) -> None:
        self.worker.stop()
        self._close_decoders(self.runtimes)

    @staticmethod
    def _close_decoders(runtimes: dict[str, ModelRuntime]) -> None:
        """End each codec process once (two models may share one)."""
        for decoder in {id(r.decoder): r.decoder for r in runtimes.values()}.values():
            decoder.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    @property
    def active_jobs(self) -> int:
        return self.worker.active_jobs

    @property
    def ready(self) -> bool:
        return True  # the models are loaded before the engine exists

    async def wait_ready(self) -> None:
        return None

    # What the models offer.

    @property
    def speakers(self) -> list[str]:
        """Preset speakers of the CustomVoice checkpoint, in its table's order."""
        runtime = self.runtimes.get(CUSTOM_VOICE)
        if runtime is None:
            return []
        return list(runtime.wrapper.model.config.talker_config.spk_id)

    def speaker_dialect(self, speaker: str) -> str | None:
        runtime = self.runtimes.get(CUSTOM_VOICE)
        if runtime is None:
            return None
        dialect = runtime.wrapper.model.config.talker_config.spk_is_dialect.get(speaker.lower(), False)
        return dialect or None

    @property
    def languages(self) -> list[str]:
        """Languages a request may name ("auto" first)."""
        runtime = next(iter(self.runtimes.values()))
        return list(runtime.wrapper.model.get_supported_languages())

    @property
    def can_clone(self) -> bool:
        return BASE in self.runtimes

    def clone_checkpoint_identity(self) -> str:
        """Fingerprint of the Base checkpoint, for keying cached clone prompts."""
        runtime = self._runtime(BASE)
        if runtime.folder is None:
            raise ValueError("the Base model was not loaded from a folder")
        return checkpoint_identity(runtime.folder)

    def streams_text(self, voice: VoiceSpec) -> bool:
        """Whether text can stream into this voice word by word (in-context clones need it whole)."""
        return not (isinstance(voice, ClonePrompt) and not voice.x_vector_only)

    def _runtime_for(self, voice: VoiceSpec) -> ModelRuntime:
        return self._runtime(CUSTOM_VOICE if isinstance(voice, PresetSpeaker) else BASE)

    def _runtime(self, role: str) -> ModelRuntime:
        runtime = self.runtimes.get(role)
        if runtime is None:
            raise ValueError(
                "Preset speakers need a CustomVoice model" if role == CUSTOM_VOICE else "Voice clones need a Base model (clone_model)"
            )
        return runtime

    # Synthesis.

    def start(
        self,
        voice: VoiceSpec,
        request: RequestOptions = RequestOptions(),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> SynthesisJob:
        """A job that speaks the text segments added to it, in ``voice``. Call from the loop."""
        if not isinstance(voice, (PresetSpeaker, ClonePrompt)):
            raise ValueError(f"The local engine speaks preset speakers and clone prompts, not {type(voice).__name__}")
        runtime = self._runtime_for(voice)
        language = resolve_language(runtime.wrapper, request.language)
        if isinstance(voice, PresetSpeaker) and voice.name.lower() not in self.speakers:
            raise ValueError(f"Unknown speaker {voice.name!r}; this model has: {', '.join(self.speakers)}")
        sampling = request.sampling or runtime.sampling
        if request.seed is not None:
            sampling = sampling.with_seed(request.seed)
        non_streaming = request.non_streaming_mode
        if non_streaming is None:
            # The package's defaults: full text up front for presets, dual track for clones.
            non_streaming = isinstance(voice, PresetSpeaker)
        stop = self.options.stop
        if request.max_frames is not None:
            stop = replace(stop, max_frames=max(1, min(stop.max_frames, request.max_frames)))
        chunks = self.options.chunks

        def make_utterance(text: str | TextFeed, segment: int) -> Utterance:
            if isinstance(text, TextFeed):
                prompt = DualTrackPrompt(runtime.wrapper, voice, language, request.instruct)
                return Utterance(prompt, sampling, stop, chunks, segment=segment, feed=text)
            prompt = build_prompt(runtime.wrapper, text, voice, language, non_streaming, request.instruct)
            return Utterance(prompt, sampling, stop, chunks, segment=segment)

        return self.worker.new_job(runtime, make_utterance, loop or asyncio.get_running_loop())

    async def synthesize(
        self, segments: Iterable[str], voice: VoiceSpec, request: RequestOptions = RequestOptions()
    ) -> AsyncIterator[AudioChunk]:
        """Speak ``segments`` in order, yielding audio as it is made; stops work if abandoned."""
        job = self.start(voice, request)
        try:
            for text in segments:
                if text.strip():
                    job.add_text(text)
            job.finish()
            async for chunk in job:
                yield chunk
        finally:
            job.cancel()

    async def clone(self, source: CloneSource) -> tuple[ClonePrompt, bool]:
        """The clone prompt for a checked sample, from the disk cache or computed (and cached)."""
        if self._clone_identity is None:
            # Reads samples of the weight files: not on the event loop.
            self._clone_identity = await asyncio.to_thread(self.clone_checkpoint_identity)
        key = prompt_key(source.audio_bytes, source.transcript, self._clone_identity)
        prompt = await asyncio.to_thread(self.clone_cache.load, key)
        if prompt is not None:
            return prompt, False
        prompt = await self.create_clone_prompt(source.samples, source.sample_rate, source.transcript)
        self.clones_computed += 1
        await asyncio.to_thread(self.clone_cache.store, key, prompt)
        return prompt, True

    async def create_clone_prompt(
        self, audio: np.ndarray, sample_rate: int, transcript: str | None
    ) -> ClonePrompt:
        """A clone prompt from a reference sample (runs on the model thread)."""
        runtime = self._runtime(BASE)

        def compute() -> ClonePrompt:
            items = runtime.wrapper.create_voice_clone_prompt(
                ref_audio=(audio.astype(np.float32), int(sample_rate)),
                ref_text=transcript,
                x_vector_only_mode=not transcript,
            )
            item = items[0]
            return ClonePrompt(
                speaker_embedding=item.ref_spk_embedding.detach().cpu(),
                ref_codes=None if item.ref_code is None else item.ref_code.detach().cpu(),
                ref_text=item.ref_text if transcript else None,
            )

        return await asyncio.wrap_future(self.worker.submit(compute))
