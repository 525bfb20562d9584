"""The codec side of batching: chunks of several streams in one call, the queue that groups them,
and the matrix-product kernels the codec's widest convolutions use."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wyoming_qwen3tts.engine.codec_kernels import (
    CodebookLookup,
    MatmulConv,
    MatmulTransposedConv,
    Snake,
    WideLinear,
    use_matmul_kernel,
)
from wyoming_qwen3tts.engine.decode import StreamingCodecDecoder
from wyoming_qwen3tts.engine.decode_queue import URGENT_SECONDS, DecodeQueue
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.engine.qwen_import import import_qwen_tts
from wyoming_qwen3tts.speech import PresetSpeaker


def random_codes(frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def decoder(unhooked_speech_tokenizer):
    """A private copy of the tiny codec decoder with our streaming hooks."""
    return StreamingCodecDecoder(copy.deepcopy(unhooked_speech_tokenizer.model.decoder))


def test_a_batch_decodes_each_stream_as_it_decodes_alone(decoder):
    streams = [random_codes(30, seed) for seed in range(3)]
    states = [decoder.new_state() for _ in streams]
    together = [[] for _ in streams]
    # Streams 1 and 2 share three calls; stream 0 arrives late, its first chunk joins the third.
    calls = [
        {1: (0, 2), 2: (0, 2)},
        {1: (2, 6), 2: (2, 6)},
        {0: (0, 4), 1: (6, 10), 2: (6, 10)},
    ]
    for call in calls:
        rows = sorted(call)
        waves = decoder.decode_batch([states[i] for i in rows], [streams[i][slice(*call[i])] for i in rows])
        for i, wave in zip(rows, waves):
            together[i].append(wave)
    for i, stream in enumerate(streams):
        state = decoder.new_state()
        alone = torch.cat([decoder.decode(state, stream[slice(*call[i])]) for call in calls if i in call])
        # A batch's convolutions round a little differently: far below one 16-bit step (3e-5).
        assert torch.allclose(torch.cat(together[i]), alone, atol=1e-4), f"stream {i}"


def test_a_failed_batch_leaves_every_stream_where_it_was(decoder, monkeypatch):
    codes = [random_codes(8, seed) for seed in range(2)]
    states = [decoder.new_state() for _ in codes]
    decoder.decode_batch(states, [c[:4] for c in codes])
    expected = [decoder.decode(s.snapshot(), c[4:]) for s, c in zip(states, codes)]
    upsample = decoder.decoder.upsample[0][0]
    original = upsample.forward

    def broken(*args, **kwargs):
        raise RuntimeError("half-way")

    monkeypatch.setattr(upsample, "forward", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        decoder.decode_batch(states, [c[4:] for c in codes])
    monkeypatch.setattr(upsample, "forward", original)
    again = decoder.decode_batch(states, [c[4:] for c in codes])
    for wave, reference in zip(again, expected):
        assert torch.allclose(wave, reference, atol=1e-4)  # a missing restore is off by far more


def test_chunks_of_different_lengths_cannot_share_a_call(decoder):
    with pytest.raises(ValueError, match="one length"):
        decoder.decode_batch([decoder.new_state(), decoder.new_state()], [random_codes(2, 0), random_codes(3, 1)])


# The queue.


def run_queue(items, max_batch=4, max_size=None):
    """Submit ``items`` (deadline, owner, name, group) while the thread is held; what ran, in order.

    A chunk's size is its group (its frames)."""
    ran, hold = [], threading.Event()
    queue = DecodeQueue("test-decode", lambda works: ran.append(sorted(works)), max_batch, max_size)
    queue.submit(-1.0, "hold", hold.wait)
    for deadline, owner, name, group in items:
        if group is None:
            queue.submit(deadline, owner, lambda name=name: ran.append(name))
        else:
            queue.submit(deadline, owner, name, group, size=group)
    hold.set()
    queue.shutdown(10)
    return ran


def test_the_earliest_deadline_goes_first():
    ran = run_queue([(3.0, "a", "a1", None), (1.0, "b", "b1", None), (2.0, "c", "c1", None)])
    assert ran == ["b1", "c1", "a1"]


def test_chunks_of_one_group_from_different_jobs_share_a_call_in_each_job_s_order():
    ran = run_queue(
        [
            (1.0, "a", "a1", 12),
            (1.0, "a", "a2", 12),  # a's second chunk waits for its first
            (2.0, "b", "b1", 12),
            (2.5, "c", "c1", 4),  # another length: its own call
            (3.0, "d", "d1", 12),
            (4.0, "a", "a-end", None),
        ]
    )
    assert ran == [["a1", "b1", "d1"], ["a2"], ["c1"], "a-end"]


def test_a_batch_takes_at_most_max_batch_chunks():
    ran = run_queue([(float(i), f"job{i}", f"c{i}", 12) for i in range(5)], max_batch=2)
    assert ran == [["c0", "c1"], ["c2", "c3"], ["c4"]]


def test_a_batch_stays_within_its_total_of_frames():
    first_chunks = [(float(i), f"job{i}", f"first{i}", 1) for i in range(6)]
    steady = [(10.0 + i, f"other{i}", f"c{i}", 12) for i in range(3)]
    ran = run_queue(first_chunks + steady, max_batch=8, max_size=24)
    assert ran == [[f"first{i}" for i in range(6)], ["c0", "c1"], ["c2"]]


# The kernels.


@pytest.mark.parametrize(("channels", "out", "kernel", "dilation", "length"), [(64, 48, 7, 1, 20), (32, 32, 7, 3, 40), (16, 24, 1, 1, 9)])
def test_the_matmul_convolution_equals_pytorch_s(channels, out, kernel, dilation, length):
    conv = torch.nn.Conv1d(channels, out, kernel, dilation=dilation)
    x = torch.randn(3, channels, length)
    with torch.inference_mode():
        assert torch.allclose(MatmulConv(conv)(x), conv(x), atol=1e-5)


@pytest.mark.parametrize(("channels", "out", "kernel", "stride", "length"), [(64, 32, 16, 8, 5), (48, 24, 10, 5, 7), (32, 32, 2, 2, 3)])
def test_the_matmul_transposed_convolution_equals_pytorch_s(channels, out, kernel, stride, length):
    conv = torch.nn.ConvTranspose1d(channels, out, kernel, stride=stride)
    x = torch.randn(2, channels, length)
    with torch.inference_mode():
        assert torch.allclose(MatmulTransposedConv(conv)(x), conv(x), atol=1e-5)


@pytest.mark.parametrize("large", [False, True], ids=["wide-layers", "every-layer-large"])
def test_a_codec_with_matmul_kernels_streams_what_the_package_decodes(custom_voice_model, unhooked_speech_tokenizer, monkeypatch, large):
    """The tiny codec's layers are too small for the kernels; force them onto every layer (and, for
    "large", every transposed convolution's weights into the kernel's layout, the module keeping
    only a view of them)."""
    from wyoming_qwen3tts.engine import codec_kernels

    monkeypatch.setattr(codec_kernels, "MIN_WEIGHTS", 0)
    if large:
        monkeypatch.setattr(codec_kernels, "LARGE_WEIGHT_BYTES", 0)
    tokenizer = copy.deepcopy(unhooked_speech_tokenizer)
    streaming = StreamingCodecDecoder(tokenizer.model.decoder)
    layers = [m for m in tokenizer.model.decoder.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear))]
    kernels = [layer.forward for layer in layers]
    assert any(isinstance(k, MatmulConv) for k in kernels) and any(isinstance(k, MatmulTransposedConv) for k in kernels)
    assert any(isinstance(k, WideLinear) for k in kernels)
    codes = random_codes(20, 7)
    reference, _rate = custom_voice_model.model.speech_tokenizer.decode([{"audio_codes": codes}])
    state = streaming.new_state()
    ours = torch.cat([streaming.decode(state, codes[a:b]) for a, b in ((0, 1), (1, 3), (3, 7), (7, 20))]).numpy()
    assert np.abs(ours - reference[0]).max() < 1e-4
    again, _rate = tokenizer.decode([{"audio_codes": codes}])  # the package's own decode, through our layers
    assert np.abs(again[0] - reference[0]).max() < 1e-4


def test_a_large_transposed_convolution_keeps_one_copy_of_its_weights():
    conv = torch.nn.ConvTranspose1d(1024, 1024, 8, stride=4)  # 32 MiB
    original = conv.weight.detach().clone()
    use_matmul_kernel(conv)
    kernel = conv.forward
    assert isinstance(kernel, MatmulTransposedConv) and kernel.large
    assert conv.weight.untyped_storage().data_ptr() == kernel.rows.untyped_storage().data_ptr()
    assert torch.equal(conv.weight, original)


def test_kernels_are_used_only_where_they_apply(monkeypatch):
    from wyoming_qwen3tts.engine import codec_kernels

    products = []
    monkeypatch.setattr(codec_kernels, "product", lambda *args: products.append(args) or codec_kernels.F.linear(*args))
    depthwise = torch.nn.Conv1d(512, 512, 7, groups=512)
    strided = torch.nn.Conv1d(512, 512, 7, stride=2)
    narrow = torch.nn.Conv1d(128, 128, 7)
    wide = torch.nn.Conv1d(512, 512, 7)
    for conv in (depthwise, strided, narrow, wide):
        use_matmul_kernel(conv)
    assert not isinstance(depthwise.forward, MatmulConv)
    assert not isinstance(strided.forward, MatmulConv)
    assert not isinstance(narrow.forward, MatmulConv)
    assert isinstance(wide.forward, MatmulConv)
    with torch.inference_mode():
        long = torch.randn(1, 512, 200)  # more positions than a third of the channels: PyTorch's own path
        assert torch.equal(wide(long), F.conv1d(long, wide.weight, wide.bias))
        assert not products
        short = torch.randn(1, 512, 40)  # the matrix product
        assert torch.allclose(wide(short), F.conv1d(short, wide.weight, wide.bias), atol=1e-5)
        assert len(products) == 1


def test_a_wide_linear_layer_equals_pytorch_s():
    linear = torch.nn.Linear(1024, 1024)
    use_matmul_kernel(linear)
    assert isinstance(linear.forward, WideLinear)
    x = torch.randn(1, 12, 1024)
    with torch.inference_mode():
        assert torch.allclose(linear(x), F.linear(x, linear.weight, linear.bias), atol=1e-5)


def test_products_fall_back_to_pytorch_s_where_onednn_s_linear_is_wrong(monkeypatch):
    from types import SimpleNamespace

    from wyoming_qwen3tts.engine import codec_kernels, quantized_linear

    def wrong(x, weight, bias, *args):
        return torch.zeros(*x.shape[:-1], weight.shape[0])

    quantized_linear.onednn_linear.cache_clear()
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace(_linear_pointwise=wrong))
    try:
        assert not quantized_linear.onednn_linear()
        x, rows = torch.randn(1, 5, 64), torch.randn(32, 64)
        assert torch.equal(codec_kernels.product(x, rows), F.linear(x, rows))
    finally:
        monkeypatch.undo()
        quantized_linear.onednn_linear.cache_clear()


def test_snake_gives_the_package_s_values_bit_for_bit():
    import_qwen_tts()
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import SnakeBeta

    snake = SnakeBeta(64)
    with torch.no_grad():
        snake.alpha.normal_(0, 0.5)
        snake.beta.normal_(0, 0.5)
    x = torch.randn(2, 64, 300)
    with torch.inference_mode():
        assert torch.equal(Snake(snake)(x), snake(x))


def test_a_codebook_lookup_gives_the_package_s_vectors_bit_for_bit():
    import_qwen_tts()
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import EuclideanCodebook

    codebook = EuclideanCodebook(dim=16, codebook_size=64)
    with torch.no_grad():
        codebook.embedding_sum.normal_()
        codebook.cluster_usage.uniform_(0, 3)  # some below epsilon: the clamp
    codes = torch.randint(0, 64, (2, 30))
    with torch.inference_mode():
        assert torch.equal(CodebookLookup(codebook)(codes), codebook.decode(codes))


def test_two_threads_never_run_one_job_s_items_at_once_and_keep_their_order():
    events, overlaps, lock = [], [], threading.Lock()
    running: set[str] = set()

    def work(owner: str, name: str):
        def run():
            with lock:
                if owner in running:
                    overlaps.append(name)
                running.add(owner)
                events.append(name)
            threading.Event().wait(0.01)
            with lock:
                running.discard(owner)

        return run

    queue = DecodeQueue("test-decode", lambda works: None, threads=2)
    for i in range(5):
        for owner in ("a", "b", "c"):
            queue.submit(float(i), owner, work(owner, f"{owner}{i}"))
    queue.shutdown(10)
    assert not overlaps, f"two items of one job at once: {overlaps}"
    assert len(events) == 15
    for owner in ("a", "b", "c"):
        assert [e for e in events if e[0] == owner] == [f"{owner}{i}" for i in range(5)]


class Overlaps:
    """Work items that record how many ran at the same time; each holds until released."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def item(self):
        def run():
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            self.started.release()
            self.release.wait(10)
            with self.lock:
                self.running -= 1

        return run


def test_a_spare_decode_thread_waits_while_the_model_is_busy_and_listeners_have_audio():
    queue = DecodeQueue("test-decode", lambda works: None, threads=2)
    queue.spares_open = False  # the model thread is stepping
    far = time.monotonic() + 60  # every listener has a minute of audio left
    overlaps = Overlaps()
    for owner in ("a", "b"):
        queue.submit(far, owner, overlaps.item())
    assert overlaps.started.acquire(timeout=10)
    assert not overlaps.started.acquire(timeout=0.3), "the spare thread took b's work beside a busy model"
    queue.spares_open = True  # the model thread has nothing to do
    assert overlaps.started.acquire(timeout=10), "the spare thread stayed idle with work queued"
    assert overlaps.most == 2
    overlaps.release.set()
    queue.shutdown(10)


def test_a_spare_decode_thread_takes_work_whose_listener_is_about_to_run_out():
    queue = DecodeQueue("test-decode", lambda works: None, threads=2)
    queue.spares_open = False
    overlaps = Overlaps()
    queue.submit(time.monotonic() + 60, "a", overlaps.item())
    assert overlaps.started.acquire(timeout=10)
    # Urgent in a fraction of a second: the spare must wake up by itself, with no other event.
    queue.submit(time.monotonic() + URGENT_SECONDS + 0.2, "b", overlaps.item())
    assert overlaps.started.acquire(timeout=10), "an urgent item waited for the busy thread"
    assert overlaps.most == 2
    overlaps.release.set()
    queue.shutdown(10)


def test_the_model_thread_closes_the_spare_decode_threads_while_it_steps(checkpoints):
    engine = SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            load=LoadOptions(device="cpu", quantize="none", threads=1),
            stop=StopRules(base_frames=30, frames_per_token=0, max_frames=30),
        )
    )
    seen: list[bool] = []
    engine.worker.step_listeners.append(lambda ids: seen.append(engine.worker._decoder.spares_open))

    async def speak():
        return [chunk async for chunk in engine.synthesize(["The kitchen lights are on."], PresetSpeaker(engine.speakers[0]))]

    assert asyncio.run(speak())
    assert seen and not any(seen), "a spare decode thread was open during a step"
    deadline = time.monotonic() + 10
    while not engine.worker._decoder.spares_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.worker._decoder.spares_open, "the spare decode threads stayed closed on an idle engine"
    engine.close()
