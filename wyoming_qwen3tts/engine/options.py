"""What the local engine is told: which checkpoints, how to place them, when to stop, how to chunk.

Plain values, no torch: the command line and the add-on build these without loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
DEFAULT_CLONE_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")
QUANTIZE = ("auto", "none", "int8", "int4")
BATCH_ATTENTION = ("auto", "rows", "padded")
CODEC_PRECISIONS = ("auto", "float32", "bfloat16")

# The package's talker may not stop before its second frame (`min_new_tokens=2`).
MIN_FRAMES = 2

# Streams per batched step when not configured: a GPU step costs about the same for 16 rows as
# for one; a CPU step grows with the rows' arithmetic, and 8 rows still share one read of the
# weights (BENCHMARKS.md, "How to read": continuous batching).
AUTO_BATCH = {"cpu": 8, "cuda": 16}
# Most frames of one codec call on a CPU, over all the streams it decodes. On glibc's allocator a
# bigger call's activations come back as fresh pages on every call and each frame costs more than
# alone; on tcmalloc (the image's) more frames per call save little (40 against 42 ms per frame)
# while every stream in the call waits for all of it (BENCHMARKS.md, "codec kernels and batches").
CPU_DECODE_FRAMES = 24
# Threads that decode different streams' chunks at the same time on a CPU. The second decodes only
# while the model thread has nothing to do or a listener is about to run out of audio
# (`DecodeQueue`): where the codec bounds the streams, the model finishes its frames first and the
# second thread then uses the core it leaves.
CPU_DECODE_THREADS = 2


@dataclass(frozen=True)
class LoadOptions:
    """How to place a model on the machine."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attention: str = "auto"  # auto | sdpa | flash_attention_2 | eager
    # Keep the talker's text embedding (311 M parameters at 0.6B) in CPU memory: it is only
    # read while building a prompt, never per frame, so a 4 GB card can hold both models.
    text_embedding_on_cpu: bool = False
    # Hand the code predictor's 15-step frame loop to torch.compile (CUDA graphs on a GPU): costs
    # a compile at start-up, pays where per-operation overhead dominates (GPUs, small models).
    compile: bool = False
    # On a GPU, record the code predictor's frame loop as CUDA graphs when not compiling: one
    # replay instead of launching ~4,400 operators a frame, recorded at start-up without a compiler.
    cuda_graphs: bool = True
    # PyTorch's CPU threads; 0: automatic. A float32 frame on CPU is bound by memory bandwidth,
    # which one thread already saturates on small machines, and a thread spinning on the last
    # core slows the event loop that streams the audio: all cores but one. A 16-bit model on CPU
    # is bound by arithmetic instead: all cores (both measured in BENCHMARKS.md).
    threads: int = 0
    # PyTorch's CPU threads of each decoding thread; 0: automatic, the cores the model's threads
    # leave (at least one), so that the model and the codec never ask for more threads than cores.
    codec_threads: int = 0
    # Weights of the talker and the code predictor: "int8" or "int4" on a CPU read fewer bytes
    # per frame (a frame there is bound by reading weights); "auto": int8 on a CPU, none on a GPU.
    quantize: str = "auto"
    # Number format of the audio codec's decoder: "auto" is float32 on a CPU and the model's dtype
    # on a GPU (the package's way). "bfloat16" on a CPU with bfloat16 arithmetic (AVX512_BF16 or
    # AMX) decodes about 1.8x faster, in the package's GPU numbers rather than float32's.
    codec_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, not {self.quantize!r}")
        if self.codec_precision not in CODEC_PRECISIONS:
            raise ValueError(f"codec_precision must be one of {', '.join(CODEC_PRECISIONS)}, not {self.codec_precision!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (automatic) or more, not {self.threads}")
        if self.codec_threads < 0:
            raise ValueError(f"codec_threads must be 0 (automatic) or more, not {self.codec_threads}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), not {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}")


@dataclass(frozen=True)
class StopRules:
    """When an utterance ends, besides the model's end-of-speech code.

    Random or confused weights may never emit the end code (the published 0.6B-Base misses it on
    about 0.3% of requests), so each utterance gets a frame cap from its text length: speech
    runs at roughly 3-4 frames per text token, and the cap allows several times that. An
    absolute cap bounds everything.
    """

    base_frames: int = 25
    frames_per_token: float = 12.0
    max_frames: int = 1500  # 120 s

    def frame_cap(self, text_tokens: int) -> int:
        derived = self.base_frames + int(self.frames_per_token * max(text_tokens, 1))
        return max(MIN_FRAMES, min(self.max_frames, derived))


@dataclass(frozen=True)
class ChunkSchedule:
    """How many frames go into each PCM chunk of an utterance.

    The first chunk is tiny so audio starts early; later chunks double up to ``max_frames`` so
    per-chunk overhead stays small once playback has a head start.
    """

    first_frames: int = 1
    max_frames: int = 12

    def __post_init__(self) -> None:
        if not 1 <= self.first_frames <= self.max_frames:
            raise ValueError("need 1 <= first_frames <= max_frames")

    @classmethod
    def starting_with(cls, first_frames: int) -> "ChunkSchedule":
        """The default doubling schedule from a first chunk of ``first_frames``."""
        return cls(first_frames=first_frames, max_frames=max(cls.max_frames, first_frames))

    def frames_in_chunk(self, index: int) -> int:
        return min(self.max_frames, self.first_frames << min(index, 16))


@dataclass(frozen=True)
class EngineOptions:
    """What to load and how to stream."""

    model: str = DEFAULT_MODEL
    clone_model: str | None = None  # a Base checkpoint; None: no cloning
    # Downloaded models (models/), compiled kernels (compile-cache/) and computed clone prompts
    # (clone-prompts/): kept so a restart reuses them.
    data_dir: Path = Path("data")
    load: LoadOptions = field(default_factory=LoadOptions)
    stop: StopRules = field(default_factory=StopRules)
    chunks: ChunkSchedule = field(default_factory=ChunkSchedule)
    # Most streams that share one batched step (0: what suits the device). More rows cost little
    # more than one while a step is bound by reading weights (CPU) or launching kernels (GPU).
    max_batch: int = 0
    # Decode audio in a process of its own instead of on threads of the model's process. It pays
    # where the model and the codec both spend their time in Python (a GPU, a small model: see
    # `codec_process.py`) and costs a second interpreter with PyTorch (about 0.5 GB; the codec's
    # weights are shared, not copied). Off by default: on a CPU the real model's time goes to
    # arithmetic, and there it measured the same as decode threads.
    codec_process: bool = False
    # How a batch of streams attends to its talker histories: "rows", one call per row over its
    # own history (on a CPU, cheaper than a padded call: BENCHMARKS.md, "talker attention for a
    # batch"); "padded", one masked call per layer over one padded tensor of all histories (a
    # GPU, where every call is a kernel launch); "auto": padded on a GPU, rows on a CPU.
    batch_attention: str = "auto"

    def __post_init__(self) -> None:
        if self.max_batch < 0:
            raise ValueError(f"max_batch must be 0 (automatic) or more, not {self.max_batch}")
        if self.batch_attention not in BATCH_ATTENTION:
            raise ValueError(f"batch_attention must be one of {', '.join(BATCH_ATTENTION)}, not {self.batch_attention!r}")

    def padded_attention(self, device_type: str) -> bool:
        """Whether batches attend in one padded, masked call per layer on this kind of device."""
        if self.batch_attention == "auto":
            return device_type != "cpu"
        return self.batch_attention == "padded"

    def batch_size(self, device_type: str) -> int:
        """The most rows of one step on this kind of device."""
        if self.max_batch:
            return self.max_batch
        return AUTO_BATCH.get(device_type, AUTO_BATCH["cpu"])

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def compile_cache_dir(self) -> Path:
        return self.data_dir / "compile-cache"

    @property
    def clone_cache_dir(self) -> Path:
        return self.data_dir / "clone-prompts"
