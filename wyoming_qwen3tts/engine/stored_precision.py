"""Loading a model in the precision its file stores, and widening it only after quantizing.

The published checkpoints store the talker in bfloat16 and the codec in float32. On a CPU the
talker runs in float32 (with int8 weights by default). Loaded straight in float32, every weight
was widened in memory before any was quantized: the int8 0.6B server's own memory peaked at
4.3 GiB while loading and held 2.6 GiB after its first reply. Loaded as stored, the talker is
quantized from its bfloat16 weights and what stays float is widened one tensor at a time, so the
peak stays near the result: 1.1 and 1.5 GiB (BENCHMARKS.md, "memory from start to first reply").

The text embedding (311 M of the 0.6B model's 906 M weights) is only read while a prompt is
built, a row per text token: it stays as stored, and its rows are widened as they are looked up.
Widening bfloat16 to float32 is exact, so every number the model computes is the same as when it
was loaded in float32; only the memory differs (0.6 GiB less for the 0.6B model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

# safetensors' names of the floating types a checkpoint may store.
_FLOAT_TYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_float_dtype(weights: Path) -> torch.dtype | None:
    """The one floating type of every floating tensor in a safetensors file (its header alone is
    read); None when it holds several, or none."""
    with safe_open(str(weights), framework="pt") as stored:
        kinds = {stored.get_slice(name).get_dtype() for name in stored.keys()}
    floats = {_FLOAT_TYPES[kind] for kind in kinds if kind in _FLOAT_TYPES}
    return floats.pop() if len(floats) == 1 else None


def narrower(stored: torch.dtype | None, wanted: torch.dtype) -> bool:
    """Whether weights stored as ``stored`` take less memory as stored and widen exactly to ``wanted``."""
    return stored in (torch.bfloat16, torch.float16) and wanted == torch.float32


def table_of_its_own(weights: Path, name: str, loaded: torch.Tensor) -> torch.Tensor:
    """Tensor ``name`` of the safetensors file ``weights`` on a mapping of the file of its own,
    where it is the tensor ``loaded`` (else ``loaded``).

    The loader's tensors share one mapping of the file, and every page that loading read stays in
    it while any of them lives: after quantizing and widening, the table kept as stored would
    keep 1.1 GB of the 0.6B model's file mapped (page cache the kernel can drop, but counted as
    the process's). On a mapping of its own, only the rows that prompts look up are read.
    """
    with safe_open(str(weights), framework="pt") as stored:
        if name not in stored.keys():
            return loaded
        table = stored.get_tensor(name)
    same = table.shape == loaded.shape and table.dtype == loaded.dtype
    if not (same and torch.equal(table[:1], loaded[:1]) and torch.equal(table[-1:], loaded[-1:])):
        return loaded
    return table


class WideningEmbedding(torch.nn.Module):
    """An embedding table kept in a narrower type, whose looked-up rows come back widened."""

    def __init__(self, embedding: torch.nn.Embedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.embedding = embedding
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).to(self.dtype)


def widen_all_but_text_embedding(model: torch.nn.Module, dtype: torch.dtype, weights: Path) -> int:
    """Widen a loaded Qwen3-TTS model (`Qwen3TTSForConditionalGeneration`) to ``dtype``, all but
    its talker's text embedding, which stays as stored in ``weights`` (on a mapping of its own)
    and widens the rows it looks up; returns the bytes the embedding keeps."""
    talker_model = model.talker.model
    embedding = talker_model.text_embedding
    name = next(name for name, tensor in model.named_parameters() if tensor is embedding.weight)
    # Out of the module tree while the rest widens: `Module.to` converts one tensor at a time, so
    # no second copy of the model exists at any moment, and parameters keep their identity.
    talker_model.text_embedding = torch.nn.Identity()
    model.to(dtype)
    table = table_of_its_own(weights, name, embedding.weight.detach())
    embedding.weight = torch.nn.Parameter(table, requires_grad=embedding.weight.requires_grad)
    talker_model.text_embedding = WideningEmbedding(embedding, dtype)
    return table.numel() * table.element_size()
