"""The code predictor's loop recorded once per batch size and replayed (CUDA graphs on a GPU).

No GPU here: `ReplayingRecorder` stands in for `CudaGraphRecorder` with the same contract (a
replay reads the loop's fixed input buffers and overwrites one fixed output tensor), so these
tests prove everything around the recording: inputs filled before each replay, the output copied
out, one recording per batch size, the self-check, and the fall-back. That PyTorch's CUDA graphs
keep the contract is for `script/device-check` on a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import MAX_NEW_TOKENS, TEXTS, generate_rows

from wyoming_qwen3tts.engine import predictor as predictor_module
from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.prompt import PresetSpeaker, build_prompt
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.speech import SamplingOptions

FRAMES = MAX_NEW_TOKENS - 1
SPEAKERS = ["Ryan", "Vivian", "Aiden"]


class ReplayingRecorder:
    """Records by running once; each replay runs again into that same output tensor."""

    def __init__(self, fault: str | None = None) -> None:
        self.recorded: list[int] = []  # the batch size of each recording, in order
        self.fault = fault
        self.replays = 0

    def record(self, run):
        if self.fault == "recording fails":
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        output = run()
        self.recorded.append(output.shape[0])

        def replay():
            self.replays += 1
            if self.fault == "a later replay fails" and self.replays > 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            output.copy_(torch.zeros_like(output) if self.fault == "replays other codes" else run())
            return output

        return replay


@pytest.fixture(scope="module")
def default_sampling(custom_voice_model) -> SamplingOptions:
    return SamplingOptions.from_generation_config(custom_voice_model.generate_defaults)


def recording_generator(model, default_sampling, recorder: ReplayingRecorder) -> FrameGenerator:
    generator = FrameGenerator(model)
    generator.predictor.recorder = recorder
    generator.warm_up(default_sampling)
    return generator


def run_streams(generator: FrameGenerator, prompts, samplings) -> list[torch.Tensor]:
    return generate_rows(generator, prompts, samplings, FRAMES)


def test_a_recorded_loop_replays_the_eager_codes_and_records_each_batch_size_once(
    custom_voice_model, default_sampling, seeds_draw_for_the_top_k
):
    wrapper = custom_voice_model
    prompts = [build_prompt(wrapper, TEXTS[i], PresetSpeaker(SPEAKERS[i]), "english", non_streaming_mode=True) for i in range(3)]
    samplings = [default_sampling.with_seed(40 + i) for i in range(3)]
    recorder = ReplayingRecorder()
    generator = recording_generator(wrapper.model, default_sampling, recorder)
    assert recorder.recorded == [1, 2], "batches up to the worker's largest are recorded before the first request"

    eager = FrameGenerator(wrapper.model)
    alone = run_streams(generator, prompts[:1], samplings[:1])[0]
    assert torch.equal(alone, run_streams(eager, prompts[:1], samplings[:1])[0])
    assert generator.predictor.recorded_frames == FRAMES, "every frame's codebooks 1-15 came from a replay"

    for replayed, expected in zip(run_streams(generator, prompts, samplings), run_streams(eager, prompts, samplings)):
        assert torch.equal(replayed, expected)
    assert recorder.recorded == [1, 2, 3], "a batch larger than those warmed up records at its first step, and only then"
    assert generator.predictor.recorded_frames == 4 * FRAMES


def test_other_sampling_settings_run_eagerly_beside_the_recorded_loop(custom_voice_model, default_sampling):
    wrapper = custom_voice_model
    prompt = build_prompt(wrapper, TEXTS[0], PresetSpeaker("Ryan"), "english", non_streaming_mode=True)
    recorder = ReplayingRecorder()
    generator = recording_generator(wrapper.model, default_sampling, recorder)
    greedy = SamplingOptions().greedy()
    ours = run_streams(generator, [prompt], [greedy])[0]
    assert torch.equal(ours, run_streams(FrameGenerator(wrapper.model), [prompt], [greedy])[0])
    assert generator.predictor.recorded_frames == 0 and recorder.recorded == [1, 2]


@pytest.mark.parametrize("fault", ["recording fails", "replays other codes", "a later replay fails"])
def test_a_recording_that_fails_falls_back_to_the_eager_loop_with_one_warning(
    custom_voice_model, default_sampling, seeds_draw_for_the_top_k, fault, caplog
):
    wrapper = custom_voice_model
    prompt = build_prompt(wrapper, TEXTS[2], PresetSpeaker("Aiden"), "english", non_streaming_mode=True)
    expected = run_streams(FrameGenerator(wrapper.model), [prompt], [default_sampling.with_seed(6)])[0]
    with caplog.at_level(logging.WARNING, logger=predictor_module.__name__):
        generator = recording_generator(wrapper.model, default_sampling, ReplayingRecorder(fault))
        ours = run_streams(generator, [prompt], [default_sampling.with_seed(6)])[0]
    assert torch.equal(ours, expected)
    assert generator.predictor.recorder is None, "no more recording attempts"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "CUDA graphs failed" in warnings[0] and "--no-cuda-graphs" in warnings[0]


def test_recording_is_for_a_gpu_without_compile_and_can_be_switched_off(custom_voice_model):
    assert FrameGenerator(custom_voice_model.model).predictor.recorder is None, "a CPU has no CUDA graphs"
    compiled = predictor_module.CodePredictorLoop(
        custom_voice_model.model.talker.code_predictor,
        custom_voice_model.model.talker.get_input_embeddings(),
        16,
        compile=True,
        recorder=ReplayingRecorder(),
    )
    assert compiled.recorder is None, "compiling records its own graphs"
    assert Settings.from_args([], {}).engine.load.cuda_graphs
    assert not Settings.from_args(["--no-cuda-graphs"], {}).engine.load.cuda_graphs
    assert not Settings.from_args([], {"QWEN3TTS_NO_CUDA_GRAPHS": "1"}).engine.load.cuda_graphs


def test_codes_from_a_replay_are_not_overwritten_by_the_next_replay(custom_voice_model, default_sampling):
    from wyoming_qwen3tts.engine.predictor import PredictorSampling
    from wyoming_qwen3tts.engine.sampling import ExponentialNoise

    generator = recording_generator(custom_voice_model.model, default_sampling, ReplayingRecorder())
    predictor, sampling = generator.predictor, PredictorSampling.of(default_sampling)
    hidden_size = predictor.code0_table.shape[1]

    def codes(seed: int) -> torch.Tensor:
        inputs = torch.Generator().manual_seed(seed)
        noise = ExponentialNoise(torch.Generator().manual_seed(seed), stock_stream=False)
        with torch.inference_mode():  # as the generator calls it
            return predictor.codes(
                torch.randn(1, 1, hidden_size, generator=inputs), torch.tensor([seed]), [sampling], [noise]
            )

    first = codes(1)
    kept = first.clone()
    second = codes(2)
    assert predictor.recorded_frames == 2
    assert not torch.equal(second, kept), "two different inputs, two different frames"
    assert torch.equal(first, kept)
