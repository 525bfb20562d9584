"""Loading Qwen3-TTS checkpoints through the official package.

A model is named by a local folder or a Hugging Face hub id. A hub id is downloaded once into the
data folder (its progress logged every few seconds) and loaded from there on every later start,
without touching the network. Device, dtype and attention implementation are chosen here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..speech import BackendUnavailableError
from .allocator import release_free_memory
from .download_progress import DownloadProgress, repository_bytes
from .options import LoadOptions
from .packed_weights import pack_float_weights, packing_fault
from .quantize import quantize_talker, resolve_mode
from .quantized_linear import prepared_bytes
from .qwen_import import import_qwen_tts
from .stored_precision import narrower, stored_float_dtype, widen_all_but_text_embedding

if TYPE_CHECKING:
    from qwen_tts import Qwen3TTSModel

_LOGGER = logging.getLogger(__name__)

# Files every 12 Hz checkpoint folder has; a folder missing one is incomplete.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "speech_tokenizer/config.json",
    "speech_tokenizer/model.safetensors",
)


class ModelUnavailableError(BackendUnavailableError):
    """The model is neither on disk nor downloadable; the message says what to do."""


@dataclass(frozen=True)
class Placement:
    """The concrete choices for one machine."""

    device: torch.device
    dtype: torch.dtype
    attention: str
    threads: int
    quantize: str = "none"  # the weights' mode, resolved for this machine
    codec_dtype: torch.dtype | None = None  # the codec decoder's, where not as loaded (`resolve_codec_dtype`)
    packed_float_weights: bool = False  # float weights in oneDNN's layout (`packed_weights.py`)


def resolve_placement(options: LoadOptions) -> Placement:
    """Turn `auto` choices into concrete ones, logging the attention choice and why."""
    if options.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'")

    if options.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, options.dtype)

    attention = options.attention
    if attention == "auto":
        attention, reason = _auto_attention(device, dtype)
        _LOGGER.info("Attention: %s (%s)", attention, reason)
    else:
        _LOGGER.info("Attention: %s (configured)", attention)
    threads = options.threads
    if not threads:
        compute_bound = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
        threads = usable_cores() if compute_bound else max(1, usable_cores() - 1)
    quantize = resolve_mode(options.quantize, device)
    return Placement(
        device=device,
        dtype=dtype,
        attention=attention,
        threads=threads,
        quantize=quantize,
        codec_dtype=resolve_codec_dtype(options.codec_precision, device),
        packed_float_weights=device.type == "cpu" and quantize == "none" and _float_layout_helps(dtype, options.compile),
    )


def _float_layout_helps(dtype: torch.dtype, compile: bool) -> bool:
    """Whether float weights of ``dtype`` go into oneDNN's layout on this CPU (`packed_weights.py`)."""
    fault = "the compiler multiplies plain weights its own way" if compile else packing_fault(dtype)
    if fault is not None:
        _LOGGER.debug("Float weights stay as loaded: %s", fault)
    return fault is None


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512_BF16 or AMX), where oneDNN's bfloat16
    convolutions run about twice as fast as float32 ones; elsewhere they are emulated, and slower.
    PyTorch's own CPU feature checks (private, hence looked up: a build without them says no)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check is not None and check() for check in checks)


def resolve_codec_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The codec decoder's dtype for ``precision``; None: as loaded (float32 on a CPU, the model's
    dtype on a GPU, as the package does)."""
    if precision == "auto":
        return None
    dtype = getattr(torch, precision)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_computes_bfloat16():
        _LOGGER.warning(
            "Codec precision bfloat16 asked for, but this CPU has no bfloat16 arithmetic (AVX512_BF16 or AMX), "
            "where it would decode slower than float32: the codec stays float32. Set it to auto to silence this."
        )
        return None
    return dtype


def codec_threads(options: LoadOptions, model_threads: int) -> int:
    """PyTorch CPU threads of each decode on a CPU: as configured, else the cores the model's
    ``model_threads`` leave (at least one), so that the two never ask for more threads than cores."""
    return options.codec_threads or max(1, usable_cores() - model_threads)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _auto_attention(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    if device.type != "cuda":
        return "sdpa", "FlashAttention 2 needs an NVIDIA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed; `pip install flash-attn` may speed up long prompts"
    major, _minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return "sdpa", "FlashAttention 2 needs an Ampere or newer GPU"
    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa", "FlashAttention 2 needs bfloat16 or float16"
    try:
        import flash_attn  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a wheel built for another torch fails oddly
        return "sdpa", f"flash-attn is installed but does not import ({err})"
    return "flash_attention_2", "flash-attn is installed and the GPU supports it"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def how_to_provide(model: str, role: str = "model") -> str:
    """What to do when ``model`` cannot be downloaded here; ``role`` is "model" or "clone model"."""
    name = model.rstrip("/").split("/")[-1]
    if os.environ.get("SUPERVISOR_TOKEN"):  # the Home Assistant add-on: /data is out of the user's reach
        option = "Model" if role == "model" else "Clone model"
        return (
            f"Download it on a computer with internet access (`hf download {model} --local-dir {name}`), copy "
            f"the folder {name} into /share/qwen3tts/models/ (the Samba share or the SSH add-on reach /share), "
            f"then set the add-on's {option} option to 'custom' and Custom {role} to /share/qwen3tts/models/{name}."
        )
    return (
        f"Download it on a machine with internet access (`hf download {model} --local-dir {name}`), copy the "
        f"folder to this machine and give its path instead of the hub id (--{role.replace(' ', '-')} /path/to/{name})."
    )


def resolve_checkpoint(model: str, models_dir: Path, offline: bool | None = None, role: str = "model") -> Path:
    """The local folder of ``model``: the folder itself, or a hub id's copy under ``models_dir``.

    A hub id not yet on disk is downloaded, its progress logged. Without network, or with
    HF_HUB_OFFLINE=1, a missing model raises ModelUnavailableError saying what to do.
    """
    as_path = Path(model).expanduser()
    if as_path.is_dir():
        if not _is_complete(as_path):
            missing = [name for name in REQUIRED_FILES if not (as_path / name).is_file()]
            raise ModelUnavailableError(
                f"Model folder {as_path} is incomplete (missing {', '.join(missing)}). "
                "It must hold a whole Qwen3-TTS 12 Hz checkpoint, speech_tokenizer/ included."
            )
        return as_path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelUnavailableError(
            f"Model {model!r} is neither an existing folder nor a Hugging Face id like "
            "'Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice'."
        )

    import huggingface_hub
    from huggingface_hub import snapshot_download

    if offline is None:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
    cache_dir = Path(models_dir)
    try:
        folder = Path(snapshot_download(model, cache_dir=cache_dir, local_files_only=True))
        if _is_complete(folder):
            return folder
    except Exception:  # noqa: BLE001 - not cached yet (or cached partially)
        pass

    how_to = how_to_provide(model, role)
    if offline:
        raise ModelUnavailableError(f"Model {model} is not in {cache_dir} and HF_HUB_OFFLINE is set. {how_to}")
    total = repository_bytes(model)
    size = f" ({total / 2**30:.1f} GiB)" if total else ""
    _LOGGER.info("Downloading %s%s into %s: once, later starts load it from there", model, size, cache_dir)
    try:
        repo_folder = cache_dir / f"models--{model.replace('/', '--')}"
        with DownloadProgress(model, repo_folder, total):
            folder = Path(snapshot_download(model, cache_dir=cache_dir))
    except Exception as err:  # noqa: BLE001 - network, auth, disk: the user needs the same advice
        raise ModelUnavailableError(
            f"Model {model} is not in {cache_dir} and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}). {how_to}"
        ) from err
    if not _is_complete(folder):
        raise ModelUnavailableError(f"Download of {model} into {folder} is incomplete. {how_to}")
    return folder


class CpuEmbedding(torch.nn.Module):
    """An embedding table held in CPU memory whose lookups come back on the model's device."""

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device) -> None:
        super().__init__()
        self.embedding = embedding.to("cpu")
        self.output_device = device

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids.to("cpu")).to(self.output_device)


def keep_text_embedding_on_cpu(wrapper: "Qwen3TTSModel") -> int:
    """Move the talker's text embedding to CPU memory; returns the bytes it frees on the device."""
    talker_model = wrapper.model.talker.model
    embedding = talker_model.text_embedding
    if isinstance(embedding, CpuEmbedding):
        return 0
    freed = embedding.weight.numel() * embedding.weight.element_size() if embedding.weight.device.type != "cpu" else 0
    talker_model.text_embedding = CpuEmbedding(embedding, wrapper.model.talker.device)
    return freed


def load_model(folder: Path, placement: Placement, text_embedding_on_cpu: bool = False) -> "Qwen3TTSModel":
    """Load a checkpoint folder with the official `Qwen3TTSModel.from_pretrained`.

    On a CPU a model stored narrower than it runs (the published bfloat16 talker, run in float32)
    is loaded as stored, quantized, and only then widened; its text embedding stays as stored
    (`stored_precision.py`: the same numbers, in less memory).
    """
    qwen_tts = import_qwen_tts()
    stored = stored_float_dtype(folder / "model.safetensors")
    narrow = placement.device.type == "cpu" and narrower(stored, placement.dtype)
    load_dtype = stored if narrow else placement.dtype
    wrapper = qwen_tts.Qwen3TTSModel.from_pretrained(
        str(folder),
        dtype=load_dtype,
        attn_implementation=placement.attention,
        device_map=str(placement.device),
    )
    wrapper.model.eval()
    if placement.device.type == "cpu" and load_dtype != torch.float32:
        # The package loads the codec in the model's dtype, rounding its float32 file; CPUs have no
        # fast reduced-precision convolutions, so it runs in float32: load it again, as stored.
        wrapper.model.load_speech_tokenizer(
            qwen_tts.Qwen3TTSTokenizer.from_pretrained(str(folder / "speech_tokenizer"), dtype=torch.float32, device_map="cpu")
        )
        release_free_memory()
    wrapper.model.speech_tokenizer.model.eval()
    if placement.codec_dtype is not None:
        # The decoder only: the encoder turns clone samples into codes once, and stays as loaded.
        wrapper.model.speech_tokenizer.model.decoder.to(placement.codec_dtype)
        _LOGGER.info("Audio codec decodes in %s (configured)", str(placement.codec_dtype).removeprefix("torch."))
    quantize_talker(wrapper.model, placement.quantize)
    if narrow:
        kept = widen_all_but_text_embedding(wrapper.model, placement.dtype, folder / "model.safetensors")
        release_free_memory()
        _LOGGER.info(
            "Loaded the weights as stored (%s) and widened them to %s after quantizing, all but the text embedding (%.1f MiB as stored)",
            str(stored).removeprefix("torch."),
            str(placement.dtype).removeprefix("torch."),
            kept / 2**20,
        )
    if placement.packed_float_weights:
        pack_float_weights(wrapper.model)
    if text_embedding_on_cpu:
        freed = keep_text_embedding_on_cpu(wrapper)
        _LOGGER.info("Text embedding kept in CPU memory (%.0f MiB freed on %s)", freed / 2**20, placement.device)
        if placement.device.type == "cuda":
            torch.cuda.empty_cache()
    return wrapper


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of weights: parameters, and the prepared (quantized or packed) weights that replaced some of them."""
    return prepared_bytes(module) + sum(p.numel() * p.element_size() for p in module.parameters())
