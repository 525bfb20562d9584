"""Continuous batching: concurrent streams share one model step, and each gets what it gets alone.

Float32 matrix products of a batch round differently from a single row's on a CPU (about 1e-5
here), so a stream's codes in a batch may only part from its codes alone where two candidates
were all but tied: every divergence must start at a choice whose two best scores lie within
1e-4. (On the tiny checkpoint no divergence has occurred; the check keeps the test honest on
machines whose kernels round otherwise.) Int8 rows are exactly batch-invariant by construction.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from helpers import TEXTS, CodeRecorder, generate_rows

from wyoming_qwen3tts.engine import predictor as predictor_module
from wyoming_qwen3tts.engine import sampling as sampling_module
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.loader import LoadOptions, load_model, resolve_placement
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.speech import JobCancelled, PresetSpeaker, RequestOptions, SamplingOptions

GREEDY = SamplingOptions().greedy()
NEAR_TIE = 1e-4
# Relative to the best score: two bfloat16 steps (a score of 8 to 16 is rounded to 1/16 there).
BFLOAT16_TIE = 2 * 2**-7
FRAMES = 24
STREAM_TEXTS = TEXTS + ["Set a timer for ten minutes."]
SPEAKERS = ["ryan", "vivian", "aiden", "serena"]


class ChoiceMargins:
    """The gap between the best and the second-best score of every code chosen, in order (and
    that gap over the best score's magnitude, in ``relative``)."""

    def __init__(self, monkeypatch) -> None:
        self.margins: list[float] = []
        self.relative: list[float] = []
        original = sampling_module.choose_with_noise

        def recording(logits, noise, temperature, top_k, top_p):
            if noise is None:
                scores = logits
            elif noise.shape[-1] < logits.shape[-1]:  # draws for the top-k candidates only
                values = logits.topk(noise.shape[-1]).values
                scores = sampling_module.candidate_probabilities(values, temperature, top_p).log() - noise.log()
            else:
                probs = sampling_module.filtered_probabilities(logits, temperature, top_k, top_p)
                scores = probs.log() - noise.log()
            top = scores.float().topk(2, dim=-1).values
            self.margins.extend((top[:, 0] - top[:, 1]).tolist())
            self.relative.extend(((top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp_min(1e-30)).tolist())
            return original(logits, noise, temperature, top_k, top_p)

        monkeypatch.setattr(sampling_module, "choose_with_noise", recording)
        monkeypatch.setattr(predictor_module, "choose_with_noise", recording)


def prompts(wrapper, count: int = 4):
    return [build_prompt(wrapper, STREAM_TEXTS[i], PresetSpeaker(SPEAKERS[i]), "english") for i in range(count)]


def run_batch(generator: FrameGenerator, prompts_, samplings) -> list[torch.Tensor]:
    return generate_rows(generator, prompts_, samplings, FRAMES)


def assert_same_or_parted_at_a_near_tie(alone: torch.Tensor, batched: torch.Tensor, margins: list[float], near_tie: float = NEAR_TIE) -> None:
    """``batched`` equals ``alone``, or first differs where the alone run's choice was a near-tie."""
    if alone.shape == batched.shape and torch.equal(alone, batched):
        return
    frames = min(len(alone), len(batched))
    differing = (alone[:frames] != batched[:frames]).nonzero()
    assert len(differing), f"same codes but different lengths: {alone.shape} vs {batched.shape}"
    frame, book = differing[0].tolist()
    margin = margins[frame * alone.shape[1] + book]
    assert margin < near_tie, f"codes part at frame {frame}, codebook {book}, where the choice was clear (margin {margin:.2e})"


SETTINGS = {
    "greedy": lambda defaults: [GREEDY] * 4,
    "seeded": lambda defaults: [defaults.with_seed(10 + i) for i in range(4)],
    # Rows with different settings in one batch: each chooses its own way.
    "mixed": lambda defaults: [
        GREEDY,
        defaults.with_seed(11),
        SamplingOptions(temperature=0.7, top_k=20, repetition_penalty=1.2).with_seed(3),
        SamplingOptions(top_p=0.8).with_seed(4),
    ],
}


@pytest.mark.parametrize("padded", [False, True], ids=["attention per row", "padded attention"])
@pytest.mark.parametrize("kind", SETTINGS)
def test_each_stream_of_a_batch_gets_the_codes_it_gets_alone(custom_voice_model, kind, padded, monkeypatch):
    wrapper = custom_voice_model
    samplings = SETTINGS[kind](SamplingOptions.from_generation_config(wrapper.generate_defaults))
    generator = FrameGenerator(wrapper.model, padded_attention=padded)
    texts = prompts(wrapper)
    assert len({p.prefill.shape[1] for p in texts}) == len(texts), "rows of different lengths, each at its own position"
    batched = run_batch(generator, texts, samplings)
    for prompt, sampling, codes in zip(texts, samplings, batched):
        recorder = ChoiceMargins(monkeypatch)
        alone = run_batch(generator, [prompt], [sampling])[0]
        assert alone.shape == (FRAMES, 16)
        assert_same_or_parted_at_a_near_tie(alone, codes, recorder.margins)


def test_int8_rows_give_exactly_the_codes_they_give_alone(checkpoints):
    wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="int8")))
    defaults = SamplingOptions.from_generation_config(wrapper.generate_defaults)
    samplings = [defaults.with_seed(20 + i) for i in range(4)]
    generator = FrameGenerator(wrapper.model)
    texts = prompts(wrapper)
    batched = run_batch(generator, texts, samplings)
    for prompt, sampling, codes in zip(texts, samplings, batched):
        assert torch.equal(run_batch(generator, [prompt], [sampling])[0], codes)


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_precision_and_weight_format_steps_a_batch(checkpoints, dtype, quantize):
    """A batched step runs in every combination a user can configure on a CPU (with int4 and
    bfloat16 it failed: the worker then retries row by row, slowly, with a warning every step)."""
    wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize=quantize, dtype=dtype)))
    codes = run_batch(FrameGenerator(wrapper.model), prompts(wrapper, 3), [GREEDY] * 3)
    assert [c.shape for c in codes] == [(FRAMES, 16)] * 3


def test_a_prefill_is_one_row_per_position_whatever_its_length(checkpoints):
    """Int8 prompts take one kernel call for all positions, and equal the row-by-row result."""
    wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="int8")))
    linear = wrapper.model.talker.codec_head.weights
    rows = torch.randn(40, linear.in_features)
    together = linear(rows)
    assert torch.equal(together, torch.cat([linear(row) for row in rows.split(1)]))


# Through the engine's worker.


@pytest.fixture(scope="module")
def engine(checkpoints):
    engine = SpeechEngine.load(
        EngineOptions(model=str(checkpoints["custom_voice"]), stop=StopRules(base_frames=40, frames_per_token=0, max_frames=40), max_batch=4)
    )
    yield engine
    engine.close()


class StepRecorder:
    """The job ids of every batched step, through the worker's public hook."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.steps: list[list[int]] = []
        self.lock = threading.Lock()

    def __enter__(self) -> "StepRecorder":
        self.engine.worker.step_listeners.append(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.worker.step_listeners.remove(self._record)

    def _record(self, ids: list[int]) -> None:
        with self.lock:
            self.steps.append(list(ids))


def start(engine, text: str, speaker: str, sampling=GREEDY):
    job = engine.start(PresetSpeaker(speaker), RequestOptions(sampling=sampling))
    job.add_text(text)
    job.finish()
    return job


async def alone_codes(engine, text: str, speaker: str) -> torch.Tensor:
    with CodeRecorder(engine) as recorder:
        job = start(engine, text, speaker)
        [chunk async for chunk in job]
    return recorder.of(job)


async def test_concurrent_requests_share_steps_and_each_gets_its_own_codes(engine):
    with CodeRecorder(engine) as codes, StepRecorder(engine) as steps:
        jobs = [start(engine, STREAM_TEXTS[i], SPEAKERS[i]) for i in range(4)]
        audio = await asyncio.gather(*(_collect(job) for job in jobs))
    assert max(len(step) for step in steps.steps) == 4, "four streams should share steps"
    assert len(steps.steps) < 4 * 40, "shared steps: fewer steps than frames"
    for i, job in enumerate(jobs):
        assert sum(chunk.frames for chunk in audio[i]) == 40
        assert torch.equal(codes.of(job), await alone_codes(engine, STREAM_TEXTS[i], SPEAKERS[i]))


async def test_max_batch_bounds_the_rows_of_a_step(checkpoints):
    engine = SpeechEngine.load(
        EngineOptions(model=str(checkpoints["custom_voice"]), stop=StopRules(base_frames=12, frames_per_token=0, max_frames=12), max_batch=2)
    )
    try:
        with StepRecorder(engine) as steps:
            jobs = [start(engine, STREAM_TEXTS[i], SPEAKERS[i]) for i in range(4)]
            audio = await asyncio.gather(*(_collect(job) for job in jobs))
    finally:
        engine.close()
    assert max(len(step) for step in steps.steps) == 2
    assert all(sum(chunk.frames for chunk in chunks) == 12 for chunks in audio)


async def test_a_request_that_arrives_mid_way_joins_the_running_batch(engine):
    with CodeRecorder(engine) as codes, StepRecorder(engine) as steps:
        first = start(engine, STREAM_TEXTS[2], "aiden")
        stream = first.__aiter__()
        received = [await stream.__anext__()]
        while codes.frames < 8:
            received.append(await stream.__anext__())
        second = start(engine, STREAM_TEXTS[1], "vivian")
        received += [chunk async for chunk in stream]
        later = [chunk async for chunk in second]
    together = [step for step in steps.steps if set(step) == {first.id, second.id}]
    assert together, "the newcomer should join the first stream's steps"
    assert steps.steps.index(together[0]) > 0 and any(step == [first.id] for step in steps.steps)
    assert sum(c.frames for c in received) == 40 and sum(c.frames for c in later) == 40
    assert torch.equal(codes.of(first), await alone_codes(engine, STREAM_TEXTS[2], "aiden"))
    assert torch.equal(codes.of(second), await alone_codes(engine, STREAM_TEXTS[1], "vivian"))


class RoundRecorder:
    """The model thread's prefills and steps, in order, with ``extra`` seconds added to each."""

    def __init__(self, engine, monkeypatch, prefill_extra: float = 0.0, step_extra: float = 0.0) -> None:
        self.events: list[str] = []
        frames = engine.runtimes["custom_voice"].frames
        prefill, step = frames.prefill, frames.step

        def slow_prefill(*args, **kwargs):
            time.sleep(prefill_extra)
            self.events.append("prefill")
            return prefill(*args, **kwargs)

        def slow_step(states):
            time.sleep(step_extra)
            self.events.append("step")
            return step(states)

        monkeypatch.setattr(frames, "prefill", slow_prefill)
        monkeypatch.setattr(frames, "step", slow_step)
        # Each case times its own prefills and steps from scratch.
        engine.worker._step_seconds = engine.worker._prefill_seconds = None

    def steps_between_prefills(self, first: int) -> int:
        """Steps between the ``first``-th prefill and the last one."""
        positions = [i for i, event in enumerate(self.events) if event == "prefill"]
        return self.events[positions[first] : positions[-1]].count("step")


async def _arrive_together_while_one_streams(engine, count: int) -> list:
    """One request streams; once its first chunk is out, ``count`` more arrive at once. Ends all."""
    running = start(engine, STREAM_TEXTS[0], SPEAKERS[0])
    stream = running.__aiter__()
    await stream.__anext__()
    with engine.worker.condition:  # the model thread's next round sees all of them, or none
        newcomers = [start(engine, STREAM_TEXTS[1 + i % 3], SPEAKERS[1 + i % 3]) for i in range(count)]
    firsts = await asyncio.gather(*(job.__aiter__().__anext__() for job in newcomers))
    for job in [running, *newcomers]:
        job.cancel()
    return firsts


async def test_requests_that_arrive_together_start_together_where_a_prefill_costs_a_fraction_of_a_step(engine, monkeypatch):
    """As on a GPU, where a step is bound by launching its operators: the newcomers' prefills fit
    in one step's time, so they are prefilled in one round and share their first step."""
    rounds = RoundRecorder(engine, monkeypatch, step_extra=0.25)
    firsts = await _arrive_together_while_one_streams(engine, 3)
    assert all(chunk.frames > 0 for chunk in firsts), "every newcomer got audio"
    assert rounds.events.count("prefill") == 4
    assert rounds.steps_between_prefills(first=1) == 0, f"the newcomers should start in one round: {rounds.events}"


async def test_where_a_prefill_costs_more_than_a_step_a_round_prefills_one_request(engine, monkeypatch):
    """As on a CPU with the real model: the running stream waits for at most one prefill per step."""
    rounds = RoundRecorder(engine, monkeypatch, prefill_extra=0.25)
    await _arrive_together_while_one_streams(engine, 3)
    assert rounds.events.count("prefill") == 4
    assert rounds.steps_between_prefills(first=1) == 2, f"one prefill per round: {rounds.events}"


async def test_a_row_cancelled_mid_batch_leaves_and_the_others_finish_undisturbed(engine):
    with CodeRecorder(engine) as codes, StepRecorder(engine) as steps:
        jobs = [start(engine, STREAM_TEXTS[i], SPEAKERS[i]) for i in range(3)]
        victim = jobs[1]
        victim_stream = victim.__aiter__()
        await victim_stream.__anext__()
        victim.cancel()
        steps_at_cancel = len(steps.steps)
        with pytest.raises(JobCancelled):
            async for _chunk in victim_stream:
                pass
        others = await asyncio.gather(*(_collect(job) for job in (jobs[0], jobs[2])))
    assert all(sum(c.frames for c in chunks) == 40 for chunks in others)
    assert sum(victim.id in step for step in steps.steps[steps_at_cancel:]) <= 1, "a cancelled row leaves within a step"
    assert codes.of(victim).shape[0] < 40
    for i in (0, 2):
        assert torch.equal(codes.of(jobs[i]), await alone_codes(engine, STREAM_TEXTS[i], SPEAKERS[i]))


async def test_a_row_that_breaks_the_step_fails_alone_and_the_others_go_on(engine, caplog):
    with CodeRecorder(engine) as codes:
        jobs = [start(engine, STREAM_TEXTS[i], SPEAKERS[i]) for i in range(3)]
        broken = jobs[0]
        stream = broken.__aiter__()
        await stream.__anext__()

        def break_its_history() -> None:
            cache = broken.current.state.talker_cache
            cache.keys = cache.keys[..., :1]  # the next write into it fails

        await asyncio.wrap_future(engine.worker.submit(break_its_history))
        with pytest.raises(RuntimeError):
            async for _chunk in stream:
                pass
        others = await asyncio.gather(*(_collect(job) for job in jobs[1:]))
    assert all(sum(c.frames for c in chunks) == 40 for chunks in others)
    assert "retrying each row alone" in caplog.text
    for i in (1, 2):
        assert torch.equal(codes.of(jobs[i]), await alone_codes(engine, STREAM_TEXTS[i], SPEAKERS[i]))


async def test_a_stream_waiting_for_text_sits_out_and_rejoins(engine):
    text = "Turn off the kitchen lights, please. It's getting late and I'm tired!"
    cut = len("Turn off the kit")
    request = RequestOptions(sampling=GREEDY, non_streaming_mode=False)
    with CodeRecorder(engine) as codes, StepRecorder(engine) as steps:
        streaming = engine.start(PresetSpeaker("ryan"), request)
        streaming.append_text(text[:cut])
        plain = start(engine, STREAM_TEXTS[3], "serena")
        plain_audio = asyncio.create_task(_collect(plain))
        await sat_out(steps, streaming.id)  # it uses up its words, however slow this machine is
        during_stall = len(steps.steps)
        await asyncio.sleep(0.3)
        stalled = steps.steps[during_stall:]
        streaming.append_text(text[cut:])
        streaming.finish()
        streamed_audio = [chunk async for chunk in streaming]
        await plain_audio
    assert stalled and all(streaming.id not in step for step in stalled), "a row without text sits out"
    assert any(streaming.id in step for step in steps.steps[during_stall + len(stalled) :]), "and rejoins when text comes"
    assert sum(c.frames for c in streamed_audio) == codes.of(streaming).shape[0]

    up_front = engine.start(PresetSpeaker("ryan"), request)
    up_front.append_text(text)
    up_front.finish()
    with CodeRecorder(engine) as alone:
        [chunk async for chunk in up_front]
    assert torch.equal(codes.of(streaming), alone.of(up_front))


async def sat_out(steps: StepRecorder, job_id: int, timeout: float = 20.0) -> None:
    """Return once the last two steps went without ``job_id`` (or after ``timeout``: a row that
    never sits out then fails the check that follows)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        with steps.lock:
            recent = steps.steps[-2:]
        if len(recent) == 2 and all(job_id not in step for step in recent):
            return
        await asyncio.sleep(0.005)


async def _collect(job):
    return [chunk async for chunk in job]


async def test_preset_and_clone_rows_never_share_a_step(checkpoints, reference_sample, tmp_path):
    engine = SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            clone_model=str(checkpoints["base"]),
            data_dir=tmp_path,
            stop=StopRules(base_frames=16, frames_per_token=0, max_frames=16),
            max_batch=4,
        )
    )
    try:
        audio, rate = reference_sample
        clone = await engine.create_clone_prompt(audio, rate, None)
        runtime_of = {}
        with StepRecorder(engine) as steps:
            jobs = []
            for i, voice in enumerate([PresetSpeaker("ryan"), clone, PresetSpeaker("vivian"), clone]):
                job = engine.start(voice, RequestOptions(sampling=GREEDY))
                job.add_text(STREAM_TEXTS[i])
                job.finish()
                runtime_of[job.id] = job.runtime
                jobs.append(job)
            audio_out = await asyncio.gather(*(_collect(job) for job in jobs))
    finally:
        engine.close()
    assert all(sum(c.frames for c in chunks) == 16 for chunks in audio_out)
    assert all(len({id(runtime_of[i]) for i in step}) == 1 for step in steps.steps), "one model per step"
    assert any(len(step) == 2 for step in steps.steps), "rows of the same model still share steps"


def test_float_weights_of_one_stream_use_the_package_s_kernel_and_a_batch_uses_onednn():
    from wyoming_qwen3tts.engine.quantized_linear import FloatLinear, onednn_linear

    weight, bias = torch.randn(768, 512) * 0.05, torch.randn(768)
    linear = FloatLinear(weight, bias)
    one = torch.randn(1, 3, 512)  # one stream, three positions (a prompt)
    assert torch.equal(linear(one), torch.nn.functional.linear(one, weight, bias)), "one stream: bit for bit the package's"
    batch = torch.randn(4, 1, 512)
    assert torch.allclose(linear(batch), torch.nn.functional.linear(batch, weight, bias), atol=1e-4)
    if onednn_linear():
        expected = torch.ops.mkldnn._linear_pointwise(batch, weight, bias, "none", [], "")
        assert torch.equal(linear(batch), expected), "several streams: oneDNN's product"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_weights_on_a_cpu_multiply_one_row_a_batch_and_a_prompt(dtype):
    """A CPU without bfloat16 or float16 arithmetic (AVX2) has no oneDNN product of them: a batch
    of streams must not ask for one (every batched step failed there), and a prompt is multiplied
    in float32. Whatever the path, the product is that of the same numbers in float32, rounded."""
    from wyoming_qwen3tts.engine.quantized_linear import FloatLinear

    weight, bias = (torch.randn(768, 512) * 0.05).to(dtype), torch.randn(768).to(dtype)  # oneDNN's size
    linear = FloatLinear(weight, bias)
    for shape in ((1, 1, 512), (4, 1, 512), (8, 1, 512), (1, 40, 512)):
        x = torch.randn(shape).to(dtype)
        out = linear(x)
        assert out.dtype == dtype and out.shape == (*shape[:-1], 768), shape
        expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        noise = (out.float() - expected).pow(2).sum() / expected.pow(2).sum()
        assert 10 * torch.log10(noise) <= -40, f"{shape}: {10 * torch.log10(noise):.1f} dB"


def test_bfloat16_streams_on_a_cpu_share_steps_and_each_gets_its_codes_alone(checkpoints, monkeypatch):
    """Eight rows: the step's products and the prompts' run in float32 on an AVX2 CPU, one row's in
    bfloat16 (where a CPU computes in bfloat16, its kernels for one row and for eight may round
    differently). Divergence is allowed only where the two best scores lay within two bfloat16
    steps of each other (on the tiny checkpoint 15 % of choices, 2.6 % exact ties)."""
    wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="none", dtype="bfloat16")))
    generator = FrameGenerator(wrapper.model)
    texts = [build_prompt(wrapper, STREAM_TEXTS[i % 4] + " Then" * i, PresetSpeaker(SPEAKERS[i % 4]), "english") for i in range(8)]
    batched = run_batch(generator, texts, [GREEDY] * 8)
    for prompt, codes in zip(texts, batched):
        recorder = ChoiceMargins(monkeypatch)
        alone = run_batch(generator, [prompt], [GREEDY])[0]
        assert alone.shape == codes.shape == (FRAMES, 16)
        assert_same_or_parted_at_a_near_tie(alone, codes, recorder.relative, near_tie=BFLOAT16_TIE)


def test_unseeded_rows_draw_exponential_noise_and_seeded_rows_the_stock_numbers():
    from wyoming_qwen3tts.engine.sampling import ExponentialNoise

    cheap = ExponentialNoise(torch.Generator().manual_seed(1), stock_stream=False).fill(torch.empty(200_000))
    assert cheap.min() > 0, "a zero would let a suppressed code win"
    assert abs(cheap.mean().item() - 1.0) < 0.01 and abs(cheap.var().item() - 1.0) < 0.03  # Exp(1)
    stock = ExponentialNoise(torch.Generator().manual_seed(2), stock_stream=True).fill(torch.empty(1000))
    assert torch.equal(stock, torch.empty(1000).exponential_(generator=torch.Generator().manual_seed(2)))


def test_unseeded_rows_draw_for_the_top_k_candidates_and_seeded_rows_for_every_code():
    from wyoming_qwen3tts.engine.sampling import noise_width

    assert noise_width(2048, 50, stock_stream=False) == 50
    assert noise_width(2048, 0, stock_stream=False) == 2048, "without top-k every code is a candidate"
    assert noise_width(30, 50, stock_stream=False) == 30
    assert noise_width(2048, 50, stock_stream=True) == 2048, "the stock numbers: one per code"


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.9, 1.0), (0.7, 0.8), (1.3, 0.3)])
def test_a_choice_among_the_top_k_is_the_choice_over_the_vocabulary_with_the_same_draws(temperature, top_p):
    """The top-k draws, placed at their candidates' ids (and no chance elsewhere), pick the same
    code over the whole vocabulary: the same distribution from 40 times fewer numbers."""
    from wyoming_qwen3tts.engine.sampling import candidate_probabilities, choose_with_noise, filtered_probabilities

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 2048, generator=generator) * 3
    top_k = 50
    values, ids = logits.topk(top_k)
    draws = torch.empty(64, top_k).exponential_(generator=generator)
    everywhere = torch.full_like(logits, float("inf")).scatter(-1, ids, draws)

    among_top_k = choose_with_noise(logits, draws, temperature, top_k, top_p)
    over_vocabulary = choose_with_noise(logits, everywhere, temperature, top_k, top_p)
    assert torch.equal(among_top_k, over_vocabulary)
    # Rows' logits differ, so distinct choices would prove nothing: the draws must move some
    # rows off the most likely code (28-47 of 64 here, by setting).
    assert (among_top_k != logits.argmax(-1)).sum() > 8, "the draws, not the logits alone, decide"

    full = filtered_probabilities(logits, temperature, top_k, top_p)
    candidates = candidate_probabilities(values, temperature, top_p)
    assert torch.allclose(full.gather(-1, ids), candidates, atol=1e-6)
    assert torch.allclose(full.sum(-1), candidates.sum(-1)), "no probability outside the top-k"
