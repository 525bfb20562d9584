"""The streaming codec decoder equals a one-shot decode, whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wyoming_qwen3tts.engine.decode import StreamingCodecDecoder
from wyoming_qwen3tts.engine.options import ChunkSchedule


@pytest.fixture(scope="module")
def codes_and_full_decode(custom_voice_model):
    # Longer than the decoder transformer's 72-frame window, so its cache must slide.
    codes = torch.randint(0, 2048, (110, 16), generator=torch.Generator().manual_seed(7))
    full, _sr = custom_voice_model.model.speech_tokenizer.decode([{"audio_codes": codes}])
    return codes, full[0]


@pytest.mark.parametrize("sizes", [[1], [2, 3], [1, 2, 4, 8, 12], [71, 1, 38], [110]])
def test_chunked_decode_equals_one_shot_decode(custom_voice_model, codes_and_full_decode, sizes):
    codes, full = codes_and_full_decode
    decoder = StreamingCodecDecoder(custom_voice_model.model.speech_tokenizer.model.decoder)
    state = decoder.new_state()
    pieces, start = [], 0
    for index in range(len(codes)):
        if start >= len(codes):
            break
        size = sizes[min(index, len(sizes) - 1)]
        pieces.append(decoder.decode(state, codes[start : start + size]).numpy())
        start += size
    audio = np.concatenate(pieces)
    assert audio.shape == full.shape == (110 * 1920,)
    assert np.abs(audio - full).max() < 1e-4


def test_hooks_leave_the_package_decode_untouched(custom_voice_model, codes_and_full_decode):
    codes, full = codes_and_full_decode
    decoder = StreamingCodecDecoder(custom_voice_model.model.speech_tokenizer.model.decoder)
    decoder.decode(decoder.new_state(), codes[:5])
    again, _sr = custom_voice_model.model.speech_tokenizer.decode([{"audio_codes": codes}])
    assert np.array_equal(again[0], full)


def test_chunk_schedule_starts_small_and_doubles_to_its_limit():
    schedule = ChunkSchedule(first_frames=1, max_frames=12)
    assert [schedule.frames_in_chunk(i) for i in range(6)] == [1, 2, 4, 8, 12, 12]
    with pytest.raises(ValueError):
        ChunkSchedule(first_frames=0)
