"""First audio with a voice's prompt beginning kept, against computing it with the rest each time.

    python benchmarks/prompt_prefix_ab.py --checkpoint CKPT [--quantize int8] [--rounds 8] [--frames 12]

One server, requests in turns: "kept" is the server as it is (the beginning's history comes from
the first request in the voice, `engine/prompt_prefixes.py`); "each time" hands the model the
same prompts with no shared beginning, so the whole prompt runs in one pass, as the server did
before it kept beginnings. The order within a round alternates, so a drift of this shared
machine's speed falls on both. Per request: first audio from `synthesize` (the sentence up front)
and from a streamed reply's `synthesize-chunk` (the text enters word by word: a prompt of the
beginning and one word), and the model thread's prefill of each. Then, without the server, the
prefills alone of the sentence and of an in-context clone's sentence (`--clone-seconds`: its
sample's length; random codes and a made-up transcript stand in, as their content does not change
the time), kept, each time, and first in the voice (nothing kept yet). Prints a table and writes a
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import wyoming_qwen3tts  # noqa: F401 - first: it sets OpenMP's defaults before torch loads
import torch
from bench import ServerThread, _free_port, machine, sentence_tokens, silence_end_of_speech
from report import publish
from wyoming_clients import TEXT, one_stream, one_streamed

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.server.app import WyomingOptions
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.speech import ClonePrompt, PresetSpeaker

MODES = ("kept", "each time")
FIRST = "first in its voice"


class PrefillRecorder:
    """Wraps a runtime's prefill: drops the prompt's shared beginning in mode "each time", and
    records the wall time of the first prefill of each request (`expect`)."""

    def __init__(self, frames) -> None:
        self.prefill = frames.prefill
        self.mode, self.kind = MODES[0], None
        self.seconds: dict[tuple[str, str], list[float]] = {}
        frames.prefill = self

    def expect(self, mode: str, kind: str) -> None:
        self.mode, self.kind = mode, kind

    def __call__(self, prompt, sampling, max_frames):
        if self.mode == "each time":
            prompt = dataclasses.replace(prompt, shared=0)
        started = time.perf_counter()
        state = self.prefill(prompt, sampling, max_frames)
        if self.kind is not None:
            self.seconds.setdefault((self.mode, self.kind), []).append(time.perf_counter() - started)
            self.kind = None
        return state


TRANSCRIPT = "Hello, this is my voice, recorded in the kitchen on a quiet Sunday morning."
CLONE_TEXTS = (
    "The washing machine has finished, and the laundry is ready to hang up.",
    "Remember to take the bins out tonight, tomorrow is collection day.",
)


def clone_voice(runtime, seconds: float) -> ClonePrompt:
    """An in-context clone with a ``seconds`` sample: random codes and speaker embedding (the
    content does not change a prefill's time)."""
    generator = torch.Generator().manual_seed(0)
    talker = runtime.wrapper.model.config.talker_config
    return ClonePrompt(
        speaker_embedding=torch.randn(talker.hidden_size, generator=generator) * 0.02,
        ref_codes=torch.randint(
            0, talker.code_predictor_config.vocab_size, (round(seconds * 12.5), talker.num_code_groups), generator=generator
        ),
        ref_text=TRANSCRIPT,
    )


def direct_prefills(runtime, prefill, prompts, rounds: int) -> dict[str, list[float]]:
    """Seconds of prefills of ``prompts`` (one voice, taken in turn) by ``prefill`` (the runtime's
    own), in the three modes in turns: kept, each time, and first in its voice (nothing kept: the
    beginning's pass of its own, then the rest). On every core, as an idle server's prefill runs
    (`EngineWorker._cores_while_codec_idle`)."""
    prefixes = runtime.frames.prefixes
    modes = (*MODES, FIRST)
    seconds_by_mode: dict[str, list[float]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        prefill(prompts[0], runtime.sampling, 1)  # keeps the voice's beginning
        for round_ in range(rounds):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                prompt = prompts[round_ % len(prompts)]
                if mode == "each time":
                    prompt = dataclasses.replace(prompt, shared=0)
                elif mode == FIRST:
                    prefixes.clear()  # the pass keeps it again, for "kept"
                started = time.perf_counter()
                prefill(prompt, runtime.sampling, 1)
                seconds_by_mode.setdefault(mode, []).append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return seconds_by_mode


def spread(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--frames", type=int, default=12, help="frames per utterance (first audio needs few)")
    parser.add_argument("--voice", default="Ryan")
    parser.add_argument("--clone-seconds", type=float, default=6.0, help="the clone sample's length (0: no clone)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()

    load = LoadOptions(device="cpu", quantize=args.quantize)
    stop = StopRules(base_frames=args.frames, frames_per_token=0, max_frames=args.frames)
    engine = SpeechEngine.load(EngineOptions(model=args.checkpoint, load=load, stop=stop))
    silence_end_of_speech(engine)
    runtime = engine.runtimes["custom_voice"]
    recorder = PrefillRecorder(runtime.frames)
    port = _free_port()
    server = ServerThread(engine, Settings(wyoming=WyomingOptions(uri=f"tcp://127.0.0.1:{port}")))
    asyncio.run(one_stream(port, args.voice))  # warm-up: it also keeps the voice's beginning
    asyncio.run(one_streamed(port, args.voice))
    first_audio: dict[tuple[str, str], list[float]] = {}
    try:
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                recorder.expect(mode, "up front")
                first = asyncio.run(one_stream(port, args.voice)).first_audio
                first_audio.setdefault((mode, "up front"), []).append(first)
                recorder.expect(mode, "streamed")
                first_audio.setdefault((mode, "streamed"), []).append(asyncio.run(one_streamed(port, args.voice)))
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
    finally:
        server.stop()
    prefixes = runtime.frames.prefixes
    kept = (prefixes.hits, prefixes.misses, len(prefixes))
    direct = []
    try:
        # On the model thread, which idles now that the server is stopped.
        sentence = build_prompt(runtime.wrapper, TEXT, PresetSpeaker(args.voice.lower()), "english")
        cases = [(f"a preset speaker's sentence ({args.voice})", [sentence])]
        if args.clone_seconds > 0:
            voice = clone_voice(runtime, args.clone_seconds)
            clone = [build_prompt(runtime.wrapper, text, voice, "english", non_streaming_mode=False) for text in CLONE_TEXTS]
            cases.append((f"an in-context clone's sentence (a {args.clone_seconds:g} s sample and its transcript)", clone))
        for name, prompts in cases:
            measure = functools.partial(direct_prefills, runtime, recorder.prefill, prompts, args.rounds)
            direct.append((name, prompts[0], engine.worker.submit(measure).result()))
    finally:
        engine.close()

    label = args.label or (
        f"prompt beginnings kept, A/B: {Path(args.checkpoint).name}, {args.quantize}, CPU, {machine().split(',')[0]}"
    )
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; checkpoint `{Path(args.checkpoint).name}`, "
        f"weights {args.quantize}, the server's default threads; {args.rounds} rounds, the two modes in turns "
        f"(order alternating), one server; the sentence is {sentence_tokens(args.checkpoint)}; voice {args.voice}",
        "- kept: the server as it is; each time: the same prompts with no shared beginning (one pass over "
        "the whole prompt, what the server did before); up front: `synthesize` with the sentence; streamed: "
        "a `synthesize-chunk` reply, timed from the chunk; prefill: the model thread's prefill of that request "
        "(the one that leads to first audio; a streamed reply's first prefill is the beginning and one word)",
        f"- kept beginnings at the end: {kept[2]} ({kept[0]} found, {kept[1]} computed)",
        "",
        "| mode | first audio, up front (ms) | prefill, up front (ms) | first audio, streamed (ms) | prefill, streamed (ms) |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        lines.append(
            f"| {mode} | {spread(first_audio[mode, 'up front'])} | {spread(recorder.seconds[mode, 'up front'])} "
            f"| {spread(first_audio[mode, 'streamed'])} | {spread(recorder.seconds[mode, 'streamed'])} |"
        )
    lines.append("")
    lines.append("- median (lowest-highest) of the rounds")
    lines += [
        "",
        f"Prefills alone, without the server, on the model thread on {os.cpu_count()} threads (as on an idle server), "
        f"{args.rounds} rounds, the three modes in turns; first in its voice: nothing kept yet, so the beginning runs as a "
        "pass of its own, then the rest (what the first request in a voice costs); ms, median (lowest-highest):",
        "",
        "| prompt | positions | of them the beginning | kept | each time | first in its voice |",
        "|---|---|---|---|---|---|",
    ]
    for name, prompt, by_mode in direct:
        lines.append(
            f"| {name} | {prompt.prefill.shape[1]} | {prompt.shared} | {spread(by_mode['kept'])} "
            f"| {spread(by_mode['each time'])} | {spread(by_mode[FIRST])} |"
        )
    publish(args.output, label, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
