"""The model side of the engine: one loaded checkpoint, and the work only it does.

Utterances are plain state (`utterance.py`); the engine worker decides which of them move and
when, and this class does the model work: taking text into a prompt and prefilling it (one
utterance at a time, between steps), making the next frame of several utterances at once (one
batched step) and decoding their chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..speech import AudioChunk, SamplingOptions
from .decode import StreamingCodecDecoder
from .generate import FrameGenerator
from .utterance import CodeChunk, Utterance

if TYPE_CHECKING:
    from qwen_tts import Qwen3TTSModel

    from .codec_process import CodecProcess


@dataclass
class ModelRuntime:
    """A loaded checkpoint and the machinery that streams from it. One owner thread for
    `prepare`/`step`, one (possibly another) for `decode`."""

    wrapper: "Qwen3TTSModel"
    frames: FrameGenerator
    decoder: "StreamingCodecDecoder | CodecProcess"
    sampling: SamplingOptions  # the checkpoint's own defaults
    folder: Path | None = None  # where the checkpoint was loaded from

    @classmethod
    def create(
        cls,
        wrapper: "Qwen3TTSModel",
        decoder: "StreamingCodecDecoder | CodecProcess | None" = None,
        folder: Path | None = None,
        compile: bool = False,
        padded_attention: bool = False,
        cuda_graphs: bool = True,
    ) -> "ModelRuntime":
        """The runtime of a loaded checkpoint; with ``compile``, `warm_up` compiles it (on a GPU
        with ``cuda_graphs`` and without ``compile``, it records it as CUDA graphs)."""
        sampling = SamplingOptions.from_generation_config(wrapper.generate_defaults)
        frames = FrameGenerator(wrapper.model, compile=compile, padded_attention=padded_attention, cuda_graphs=cuda_graphs)
        return cls(
            wrapper=wrapper,
            frames=frames,
            decoder=decoder or StreamingCodecDecoder(wrapper.model.speech_tokenizer.model.decoder),
            sampling=sampling,
            folder=folder,
        )

    def warm_up(self, max_rows: int) -> None:
        """Compile (or record) the code predictor now, if compiling (or recording), for batches of
        up to ``max_rows``. Call it on the thread that will step the model: PyTorch keeps compiled
        CUDA graphs per thread, and graphs made on another would be made again by the first requests."""
        self.frames.warm_up(self.sampling, max_rows)

    def prepare(self, utterance: Utterance) -> None:
        """Take the text that arrived into the prompt, and prefill once the prompt can start."""
        if utterance.has_text_news:
            text, complete = utterance.feed.take()
            utterance.dual.add_tokens(utterance.tokens.push(text, finished=complete))
            if complete:
                utterance.dual.finish()
            utterance.text_grew(complete)
        if utterance.needs_prefill:
            utterance.state = self.frames.prefill(utterance.prompt, utterance.sampling, utterance.frame_cap)

    def step(self, utterances: Sequence[Utterance]) -> list[CodeChunk | None]:
        """One frame for each of ``utterances`` (all prepared), in one batched step; each one's
        chunk when its frames make one."""
        frames = self.frames.step([u.state for u in utterances])
        return [u.take_frame(frame) for u, frame in zip(utterances, frames)]

    def advance(self, utterance: Utterance) -> CodeChunk | None:
        """Move ``utterance`` alone by one unit of work (take text and prefill, or take text and
        make a frame): a chunk's frames when they are complete."""
        started = utterance.state is not None
        self.prepare(utterance)
        if not started or not utterance.steppable:
            return None
        return self.step([utterance])[0]

    def decode(self, utterance: Utterance, chunk: CodeChunk) -> AudioChunk:
        """The audio of ``chunk``; an utterance's chunks must come in the order they were made."""
        return self.decode_batch([utterance], [chunk])[0]

    def decode_batch(self, utterances: Sequence[Utterance], chunks: Sequence[CodeChunk]) -> list[AudioChunk]:
        """The audio of chunks of one length of several utterances, in one codec call."""
        states = []
        for utterance in utterances:
            if utterance.decoder_state is None:
                state = self.decoder.new_state()
                if utterance.prompt.ref_codes is not None:
                    # A cloned voice's audio continues its reference: decode that first, as context.
                    self.decoder.decode(state, utterance.prompt.ref_codes)
                utterance.decoder_state = state
            states.append(utterance.decoder_state)
        waves = self.decoder.decode_batch(states, [chunk.codes for chunk in chunks])
        return [u.audio_chunk(chunk, wave.cpu().numpy()) for u, chunk, wave in zip(utterances, chunks, waves)]
