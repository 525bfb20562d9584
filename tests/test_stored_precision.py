"""Loading a model as its file stores it (bfloat16, as published) and widening it after quantizing."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy_frames
from safetensors.torch import save_file

from wyoming_qwen3tts.dev.tiny_checkpoint import build_checkpoint
from wyoming_qwen3tts.engine.loader import LoadOptions, load_model, resolve_placement
from wyoming_qwen3tts.engine.quantize import PreparedLinear, quantize_talker
from wyoming_qwen3tts.engine.qwen_import import import_qwen_tts
from wyoming_qwen3tts.engine.stored_precision import WideningEmbedding, narrower, stored_float_dtype, table_of_its_own


@pytest.fixture(scope="module")
def bfloat16_checkpoint(tmp_path_factory):
    """A tiny CustomVoice checkpoint stored as the published ones are: the model in bfloat16."""
    folder = tmp_path_factory.mktemp("stored") / "custom_voice"
    return build_checkpoint(folder, kind="custom_voice", size="tiny", seed=3, model_dtype=torch.bfloat16)


def loaded_in_float32(folder, mode: str):
    """The model as loading it straight in float32 gives it, then quantized: the server's way before."""
    wrapper = import_qwen_tts().Qwen3TTSModel.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa", device_map="cpu")
    wrapper.model.eval()
    quantize_talker(wrapper.model, mode)
    return wrapper


def tensors(wrapper) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model and of its codec, by name (the text embedding's by the package's name)."""
    found = {}
    for prefix, module in (("", wrapper.model), ("codec.", wrapper.model.speech_tokenizer.model)):
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            found[prefix + name.replace("text_embedding.embedding.", "text_embedding.")] = tensor
    return found


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_a_bfloat16_checkpoint_loaded_as_stored_has_the_very_weights_and_codes_of_a_float32_load(bfloat16_checkpoint, mode):
    placement = resolve_placement(LoadOptions(device="cpu", quantize=mode))
    assert placement.dtype == torch.float32
    stored = load_model(bfloat16_checkpoint, placement)
    widened_first = loaded_in_float32(bfloat16_checkpoint, placement.quantize)

    # The text embedding stays as stored; its rows come back as a float32 load gives them.
    embedding = stored.model.talker.get_text_embeddings()
    assert isinstance(embedding, WideningEmbedding) and embedding.weight.dtype == torch.bfloat16
    ids = torch.arange(0, embedding.weight.shape[0], 3)
    looked_up = embedding(ids)
    assert looked_up.dtype == torch.float32 and torch.equal(looked_up, widened_first.model.talker.get_text_embeddings()(ids))
    # The package makes its own tensors in the talker's dtype: it must read float32.
    assert stored.model.talker.dtype == torch.float32 and stored.model.dtype == torch.float32

    # Every other weight and buffer, the codec's included, is exactly the float32 load's.
    ours, theirs = tensors(stored), tensors(widened_first)
    assert ours.keys() == theirs.keys()
    assert ours["talker.model.text_embedding.weight"] is embedding.weight
    for name, tensor in theirs.items():
        if name != "talker.model.text_embedding.weight":
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    quantized = {name: module for name, module in stored.model.named_modules() if isinstance(module, PreparedLinear)}
    assert bool(quantized) == (mode != "none")
    for name, module in widened_first.model.named_modules():
        if isinstance(module, PreparedLinear):
            x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
            assert torch.equal(quantized[name](x), module(x)), name
    assert torch.equal(greedy_frames(stored, 10), greedy_frames(widened_first, 10))


def test_on_a_cpu_the_codec_keeps_its_stored_float32_weights_when_the_model_runs_in_bfloat16(bfloat16_checkpoint):
    # The package loads the codec in the model's dtype; the CPU runs it in float32, which used to
    # mean the file's float32 weights rounded to bfloat16 and widened again.
    placement = resolve_placement(LoadOptions(device="cpu", dtype="bfloat16", quantize="none"))
    wrapper = load_model(bfloat16_checkpoint, placement)
    assert wrapper.model.talker.dtype == torch.bfloat16
    assert not isinstance(wrapper.model.talker.get_text_embeddings(), WideningEmbedding)
    codec = dict((*wrapper.model.speech_tokenizer.model.named_parameters(), *wrapper.model.speech_tokenizer.model.named_buffers()))
    as_stored = loaded_in_float32(bfloat16_checkpoint, "none").model.speech_tokenizer.model
    for name, tensor in (*as_stored.named_parameters(), *as_stored.named_buffers()):
        assert codec[name].dtype == tensor.dtype and torch.equal(codec[name], tensor), name


def test_the_stored_float_type_is_read_from_the_file_header(tmp_path, bfloat16_checkpoint, checkpoints):
    assert stored_float_dtype(bfloat16_checkpoint / "model.safetensors") == torch.bfloat16
    assert stored_float_dtype(checkpoints["custom_voice"] / "model.safetensors") == torch.float32
    assert stored_float_dtype(bfloat16_checkpoint / "speech_tokenizer" / "model.safetensors") == torch.float32
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "ids": torch.zeros(2, dtype=torch.long)}, str(tmp_path / "ids.safetensors"))
    assert stored_float_dtype(tmp_path / "ids.safetensors") == torch.bfloat16
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2)}, str(tmp_path / "mixed.safetensors"))
    assert stored_float_dtype(tmp_path / "mixed.safetensors") is None


def test_only_a_narrower_stored_type_that_widens_exactly_is_loaded_as_stored():
    assert narrower(torch.bfloat16, torch.float32) and narrower(torch.float16, torch.float32)
    assert not narrower(torch.float32, torch.float32)
    assert not narrower(torch.bfloat16, torch.float16)  # not exact: float16 has less range
    assert not narrower(torch.float32, torch.bfloat16)
    assert not narrower(torch.bfloat16, torch.bfloat16)
    assert not narrower(None, torch.float32)


def test_the_kept_table_is_mapped_afresh_from_the_file_only_where_it_is_the_loaded_tensor(tmp_path):
    table = torch.randn(6, 4).to(torch.bfloat16)
    save_file({"table": table}, str(tmp_path / "weights.safetensors"))
    fresh = table_of_its_own(tmp_path / "weights.safetensors", "table", table.clone())
    assert torch.equal(fresh, table) and fresh.untyped_storage().data_ptr() != table.untyped_storage().data_ptr()
    changed = table.clone()
    changed[-1] += 1
    assert table_of_its_own(tmp_path / "weights.safetensors", "table", changed) is changed
    assert table_of_its_own(tmp_path / "weights.safetensors", "another", changed) is changed
