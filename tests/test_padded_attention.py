"""Padded attention: a batch's talker histories as slots of one tensor, one masked call per layer.

What a GPU runs by default (`EngineOptions.batch_attention`); here on the CPU, where it must give
what attention row by row gives, and keep its slots in order as utterances come and go.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import CodeRecorder

from wyoming_qwen3tts.dev.operator_count import OperatorCount
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.kv_cache import KVSlots, PaddedRows, RowCaches, StaticKVCache, attention
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.speech import JobCancelled, PresetSpeaker, RequestOptions, SamplingOptions

LAYERS, KV_HEADS, HEADS, HEAD_DIM = 2, 2, 4, 8
SCALE = HEAD_DIM**-0.5
GREEDY = SamplingOptions().greedy()
TEXTS = ["Turn on the kitchen lights.", "What's the weather like tomorrow?", "Set a timer for ten minutes."]
SPEAKERS = ["ryan", "vivian", "aiden"]


def filled(cache, length: int, seed: int) -> None:
    """Write ``length`` positions of history into every layer of ``cache``."""
    generator = torch.Generator().manual_seed(seed)
    for layer in range(LAYERS):
        keys, values = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator) for _ in range(2))
        cache.update(keys, values, layer)
    cache.advance(length)


def one_step(batch, rows: int, seed: int) -> list[torch.Tensor]:
    """Every layer's attention output of one new position per row."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(LAYERS):
        q = torch.randn(rows, HEADS, 1, HEAD_DIM, generator=generator)
        k, v = (torch.randn(rows, KV_HEADS, 1, HEAD_DIM, generator=generator) for _ in range(2))
        out.append(batch.attend(layer, q, k, v, SCALE))
    batch.advance(1)
    return out


class ConcatenatedKVCache:
    """A reference cache that holds exactly the positions written, nothing more."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = [None] * LAYERS
        self.values: list[torch.Tensor | None] = [None] * LAYERS

    def update(self, keys, values, layer):
        if self.keys[layer] is not None:
            keys, values = torch.cat((self.keys[layer], keys), dim=2), torch.cat((self.values[layer], values), dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    def attend(self, layer, q, k, v, scaling):
        return attention(q, *self.update(k, v, layer), scaling)

    def advance(self, steps: int) -> None:
        pass


def row_caches(lengths: list[int]) -> list[StaticKVCache]:
    caches = [StaticKVCache(LAYERS, KV_HEADS, HEAD_DIM, 4, torch.float32, "cpu") for _ in lengths]
    for i, (cache, length) in enumerate(zip(caches, lengths)):
        filled(cache, length, seed=i)
    return caches


def slot_caches(slots: KVSlots, lengths: list[int]):
    caches = [slots.take(4) for _ in lengths]
    for i, (cache, length) in enumerate(zip(caches, lengths)):
        filled(cache, length, seed=i)
    return caches


@pytest.mark.parametrize("order", ["slots in a run", "a run from the second slot", "slots out of order"])
def test_a_padded_batch_attends_as_each_row_does_over_its_own_history(order):
    lengths = [3, 9, 5]
    slots = KVSlots(LAYERS, KV_HEADS, HEAD_DIM, torch.float32, "cpu", slots=2, capacity=4)
    held = slots.take(4) if order == "a run from the second slot" else None  # slot 0 stays taken
    padded = slot_caches(slots, lengths)
    assert [c.slot for c in padded] == ([1, 2, 3] if held else [0, 1, 2])
    own = row_caches(lengths)
    if order == "slots out of order":
        padded, own, lengths = padded[::-1], own[::-1], lengths[::-1]
    assert slots.slots >= 3 and slots.capacity >= 9, "slots and capacity grow as needed"
    for step in range(3):  # the next steps see the positions the earlier ones wrote
        expected = one_step(RowCaches(own), len(lengths), seed=100 + step)
        got = one_step(PaddedRows(padded), len(lengths), seed=100 + step)
        for layer_expected, layer_got in zip(expected, got):
            assert layer_got.shape == layer_expected.shape
            torch.testing.assert_close(layer_got, layer_expected, atol=1e-5, rtol=1e-5)
    assert [c.length for c in padded] == [n + 3 for n in lengths]


def test_a_row_alone_in_a_slot_attends_as_its_own_cache_does_bit_for_bit():
    slots = KVSlots(LAYERS, KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    [padded] = slot_caches(slots, [6])
    [own] = row_caches([6])
    for expected, got in zip(one_step(RowCaches([own]), 1, seed=7), one_step(RowCaches([padded]), 1, seed=7)):
        assert torch.equal(got, expected)


def test_a_row_cache_reads_only_the_positions_written_into_it():
    """Its memory is left uninitialised (zeroing a real-size cache cost 12 ms of every prefill):
    whatever lies beyond the positions written, here NaN, must never reach attention, also after
    the cache has grown."""
    cache = StaticKVCache(LAYERS, KV_HEADS, HEAD_DIM, 4, torch.float32, "cpu")
    cache.keys.fill_(float("nan"))
    cache.values.fill_(float("nan"))
    written = ConcatenatedKVCache()
    filled(cache, 3, seed=0)
    filled(written, 3, seed=0)
    for step in range(4):
        cache.keys[:, :, :, cache.length :] = float("nan")
        cache.values[:, :, :, cache.length :] = float("nan")
        for expected, got in zip(one_step(written, 1, seed=10 + step), one_step(cache, 1, seed=10 + step)):
            assert torch.isfinite(got).all()
            assert torch.equal(got, expected)
    assert cache.capacity > 4, "the cache grew during the steps"


def test_slots_come_back_when_an_utterance_ends_or_is_dropped_and_are_reused_clean():
    slots = KVSlots(LAYERS, KV_HEADS, HEAD_DIM, torch.float32, "cpu", slots=2, capacity=4)
    first, second = slot_caches(slots, [3, 3])
    assert slots.in_use == 2
    first.release()
    first.release()  # twice is harmless
    assert slots.in_use == 1
    slot = second.slot
    slots.keys[:, slot] = float("nan")  # what a row whose step broke may leave behind
    del second
    gc.collect()
    assert slots.in_use == 0, "a dropped cache gives its slot back"
    reused = [slots.take(4), slots.take(4)]
    assert reused[1].slot == slot
    # The reused slot's row is the shorter: its stale positions beyond its history are masked.
    for cache, length in zip(reused, [4, 2]):
        filled(cache, length, seed=length)
    # PyTorch's math kernel (its fallback on every device) weighs masked positions by 0, and 0 * NaN is NaN.
    with sdpa_kernel(SDPBackend.MATH):
        outputs = one_step(PaddedRows(reused), 2, seed=3)
    assert all(torch.isfinite(out).all() for out in outputs), "stale NaN in a reused slot leaked into attention"


def talker_operators(model, rows: int, padded: bool) -> int:
    """Operators one batched talker step of ``rows`` streams dispatches (on a GPU: host work)."""
    generator = FrameGenerator(model.model, padded_attention=padded)
    states = [
        generator.prefill(build_prompt(model, TEXTS[i % 3], PresetSpeaker(SPEAKERS[i % 3]), "english"), GREEDY, 50)
        for i in range(rows)
    ]
    generator.step(states)  # makes each row's first frame, which the talker reads next
    counter = OperatorCount()
    with torch.inference_mode(), counter:
        generator._advance_talker(states)
    return counter.calls


def test_padded_attention_dispatches_no_operators_per_row_and_layer(custom_voice_model):
    per_row = {rows: talker_operators(custom_voice_model, rows, padded=False) for rows in (2, 8)}
    padded = {rows: talker_operators(custom_voice_model, rows, padded=True) for rows in (2, 8)}
    layers = custom_voice_model.model.config.talker_config.num_hidden_layers
    grown = per_row[8] - per_row[2]
    assert grown >= 6 * layers * 10, f"per row: operators for every row and layer {per_row}"
    # Beyond attention a few operators per row remain (a row's repetition-penalty mark, its slice
    # of the output), none per layer.
    assert padded[8] - padded[2] <= grown / 4, f"padded attention grew with the rows: {padded} against {per_row}"


def test_batch_attention_is_padded_on_a_gpu_and_per_row_on_a_cpu_unless_chosen():
    assert EngineOptions().padded_attention("cuda") and not EngineOptions().padded_attention("cpu")
    assert EngineOptions(batch_attention="padded").padded_attention("cpu")
    assert not EngineOptions(batch_attention="rows").padded_attention("cuda")
    with pytest.raises(ValueError, match="batch_attention must be one of auto, rows, padded"):
        EngineOptions(batch_attention="masked")


# Through the engine's worker.


def load(checkpoints, batch_attention: str) -> SpeechEngine:
    return SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            stop=StopRules(base_frames=30, frames_per_token=0, max_frames=30),
            max_batch=4,
            batch_attention=batch_attention,
        )
    )


async def codes_of(engine, cancel_second: bool) -> list[torch.Tensor | None]:
    """Each stream's codes (None for the one cancelled). Codes, not audio: the codec rounds a
    chunk differently with whichever other streams' chunks it decodes together."""
    jobs = []
    for text, speaker in zip(TEXTS, SPEAKERS):
        job = engine.start(PresetSpeaker(speaker), RequestOptions(sampling=GREEDY))
        job.add_text(text)
        job.finish()
        jobs.append(job)

    async def collect(i: int) -> None:
        stream = jobs[i].__aiter__()
        chunks = [await stream.__anext__()]
        if cancel_second and i == 1:
            jobs[i].cancel()
            with pytest.raises(JobCancelled):
                async for _chunk in stream:
                    pass
            return
        chunks += [chunk async for chunk in stream]
        assert sum(c.frames for c in chunks) == 30

    with CodeRecorder(engine) as recorder:
        await asyncio.gather(*(collect(i) for i in range(len(jobs))))
    return [None if cancel_second and i == 1 else recorder.of(job) for i, job in enumerate(jobs)]


async def test_streams_batched_with_padded_attention_get_the_codes_they_get_per_row(checkpoints):
    padded, rows = load(checkpoints, "padded"), load(checkpoints, "rows")
    try:
        runtime = padded.runtimes["custom_voice"]
        assert runtime.frames.slots is not None and rows.runtimes["custom_voice"].frames.slots is None
        expected = await codes_of(rows, cancel_second=False)
        got = await codes_of(padded, cancel_second=True)
        for i in (0, 2):
            assert torch.equal(got[i], expected[i]), "a cancelled row left the others undisturbed"
        gc.collect()
        assert runtime.frames.slots.in_use == 0, "every utterance gave its slot back"
        assert runtime.frames.slots.slots <= 4
    finally:
        padded.close()
        rows.close()
