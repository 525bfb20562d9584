"""Where the codec decodes: on threads of the model's process or in a process of its own, A/B.

    python benchmarks/codec_process_ab.py --checkpoint CKPT [--quantize int8] [--frames 60] [--concurrency 1,4,8] [--rounds 3]

Both engines are loaded side by side in one process and take turns, burst by burst (the order
swaps every round), so that a noisy machine's slow minutes fall on both: `bench.py
--codec-process off,on` runs one setting after the other, and on our shared VMs a whole phase
can land in a slow period. A burst starts N streams of the same utterance (end-of-speech code
off, exactly --frames frames each) through the engine's own asyncio API, not over TCP, so that no
client shares the server's interpreter. Reports each setting's best aggregate frames per second
over the rounds, its ratio to one stream of the same setting, and the median first audio.
Writes a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from bench import machine, sentence_tokens, silence_end_of_speech
from report import write_report
from wyoming_clients import TEXT

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.speech import PresetSpeaker

SETTINGS = {"threads": False, "own process": True}


async def one_stream(engine: SpeechEngine, speaker: str, started: float) -> tuple[float, int]:
    first, frames = None, 0
    async for chunk in engine.synthesize([TEXT], PresetSpeaker(speaker)):
        if first is None:
            first = time.perf_counter() - started
        frames += chunk.frames
    return first, frames


async def burst(engine: SpeechEngine, streams: int) -> tuple[float, float]:
    """Aggregate frames per second and median first audio of ``streams`` streams started together."""
    started = time.perf_counter()
    speakers = engine.speakers
    results = await asyncio.gather(*(one_stream(engine, speakers[i % len(speakers)], started) for i in range(streams)))
    wall = time.perf_counter() - started
    return sum(frames for _first, frames in results) / wall, statistics.median(first for first, _frames in results)


async def measure(args) -> dict[tuple[str, int], list[tuple[float, float]]]:
    stop = StopRules(base_frames=args.frames, frames_per_token=0, max_frames=args.frames)
    load = LoadOptions(device="cpu", quantize=args.quantize, threads=args.threads)
    engines = {
        name: SpeechEngine.load(EngineOptions(model=args.checkpoint, load=load, stop=stop, codec_process=own))
        for name, own in SETTINGS.items()
    }
    counts = [int(c) for c in args.concurrency.split(",") if c.strip()]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {(name, c): [] for name in engines for c in counts}
    try:
        for engine in engines.values():
            silence_end_of_speech(engine)
            await burst(engine, 1)  # warm-up
        for round_ in range(args.rounds):
            order = list(engines.items()) if round_ % 2 == 0 else list(reversed(engines.items()))
            for count in counts:
                for name, engine in order:
                    results[(name, count)].append(await burst(engine, count))
                    fps, first = results[(name, count)][-1]
                    print(f"round {round_}: {name}, {count} streams: {fps:.1f} frames/s, first audio {first:.3f} s", flush=True)
    finally:
        for engine in engines.values():
            await engine.aclose()
    return results


def render(args, results) -> str:
    lines = [
        f"- machine: {machine()}",
        f"- checkpoint `{Path(args.checkpoint).name}`, weights {args.quantize}, {args.frames} frames per stream, "
        f"{args.rounds} rounds alternating the two settings (best of the rounds); {sentence_tokens(args.checkpoint)}",
        "",
        "| codec decodes on | streams | aggregate frames/s | vs one stream | first audio, median over rounds (s) |",
        "|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        single = max(fps for fps, _first in results.get((name, 1), [])) if (name, 1) in results else None
        for (setting, count), runs in results.items():
            if setting != name:
                continue
            best = max(fps for fps, _first in runs)
            ratio = f"{best / single:.2f}x" if single else ""
            lines.append(f"| {name} | {count} | {best:.1f} | {ratio} | {statistics.median(first for _fps, first in runs):.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    report = render(args, asyncio.run(measure(args)))
    print(report)
    label = args.label or f"codec in a process of its own or on threads, A/B: {Path(args.checkpoint).name}, CPU, {args.quantize}"
    write_report(args.output, label, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
