"""The model alone, without the server: one batched frame step by rows, and the codec's decode.

    python benchmarks/step_probe.py --checkpoint CKPT [--device cuda] [--rows 1,4,8,16] [--compile]
                                    [--no-cuda-graphs] [--threads 1,2,4,8] [--codec-chunks 1,12]

For each row count: the wall time of one frame step of that many streams (talker, code
predictor, the whole step), the frames per second the model alone could give them, one
request's prefill, and one codec call decoding a chunk of every row (1 frame, then 12). Beside
`bench.py`, which measures the same streams through the Wyoming server, it says whether a
batch's shortfall is the model's or the serving's (scheduling, prefills, decoding, the
interpreter lock). With ``--compile`` it
first compiles the code predictor as the server does and prints how long that took; on a GPU
without it, it records the code predictor as CUDA graphs as the server does (for batches up to
the largest row count) and prints how long that took, unless ``--no-cuda-graphs``. Each
line is printed as soon as it is measured, so a run stopped at a time limit still says what it
got; SIGUSR1 prints every thread's stack (`script/device-check` sends it at a step's limit).
On a CPU, ``--threads`` repeats every row count at each number of PyTorch threads: how a step of
one stream (many small products) and a codec call scale with cores on this machine.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
import time
from pathlib import Path

import wyoming_qwen3tts  # noqa: F401 - first: it sets OpenMP's defaults before torch loads
import torch
from bench import machine
from report import publish
from wyoming_clients import TEXT

from wyoming_qwen3tts.engine.huge_pages import move_weights_to_huge_pages
from wyoming_qwen3tts.engine.loader import LoadOptions, load_model, resolve_placement
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.engine.runtime import ModelRuntime
from wyoming_qwen3tts.speech import PresetSpeaker

CHUNKS = "1,12"  # a stream's first chunk, and a later one


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_rows(runtime: ModelRuntime, rows: int, steps: int, chunks: tuple[int, ...]) -> dict[str, float]:
    """Milliseconds of one step of ``rows`` streams (each a few frames in, at its own length),
    by stage, and of one codec call per chunk length."""
    wrapper, frames = runtime.wrapper, runtime.frames
    speakers = list(wrapper.model.config.talker_config.spk_id)
    words = TEXT.split()
    device = wrapper.device
    synchronize(device)
    started = time.perf_counter()
    states = [
        frames.prefill(
            build_prompt(wrapper, " ".join(words[: 6 + i]), PresetSpeaker(speakers[i % len(speakers)]), "english"),
            runtime.sampling,
            10_000,
        )
        for i in range(rows)
    ]
    synchronize(device)
    # A round prefills as many waiting requests as fit in one step's time (engine/worker.py).
    prefill = (time.perf_counter() - started) / rows * 1000
    for _ in range(3):
        frames.step(states)
    frames.timings.reset()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        frames.step(states)
    synchronize(device)
    result = {"step": (time.perf_counter() - started) / steps * 1000, "prefill": prefill}
    for stage in ("talker", "predictor"):
        # Host time per step (on a GPU: the time to launch the stage's work, which bounds it there).
        result[stage] = frames.timings.seconds[stage] / steps * 1000
    decoder = runtime.decoder
    codes = torch.zeros(max(chunks, default=0), 16, dtype=torch.long, device=device)
    for length in chunks:
        decoder_states = [decoder.new_state() for _ in range(rows)]
        decoder.decode_batch(decoder_states, [codes[:length]] * rows)  # warm-up, and a history to continue
        best = float("inf")
        for _ in range(3):
            synchronize(device)
            started = time.perf_counter()
            decoder.decode_batch(decoder_states, [codes[:length]] * rows)
            synchronize(device)
            best = min(best, time.perf_counter() - started)
        result[f"codec {length}"] = best * 1000
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="CustomVoice checkpoint folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="none", help="weights: none, int8, int4 (auto: the server's default)")
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--steps", type=int, default=20, help="steps timed per row count")
    parser.add_argument("--compile", action="store_true", help="compile the code predictor first, as --compile does")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, do not record the code predictor as CUDA graphs")
    parser.add_argument("--threads", default=None, help="PyTorch CPU threads to measure in turn, e.g. 1,2,4 (default: the server's for the model)")
    parser.add_argument("--codec-chunks", default=CHUNKS, help="chunk lengths (frames) to time the codec with; 'none' for none")
    parser.add_argument("--batch-attention", choices=("rows", "padded"), default=None, help="default: the engine's for the device")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--label", default="one batched step, the model alone")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    placement = resolve_placement(LoadOptions(device=args.device, quantize=args.quantize, compile=args.compile))
    wrapper = load_model(Path(args.checkpoint), placement)
    if placement.device.type == "cpu":
        move_weights_to_huge_pages()  # as the server does once its models are loaded
    padded = placement.device.type == "cuda" if args.batch_attention is None else args.batch_attention == "padded"
    runtime = ModelRuntime.create(wrapper, compile=args.compile, padded_attention=padded, cuda_graphs=not args.no_cuda_graphs)
    recording = runtime.frames.predictor.recorder is not None
    chunks = () if args.codec_chunks == "none" else tuple(int(c) for c in args.codec_chunks.split(","))
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [placement.threads]
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; device {wrapper.device}, weights {placement.quantize}, "
        f"{'/'.join(map(str, thread_counts))} threads; checkpoint `{Path(args.checkpoint).name}`; batch attention "
        f"{'padded' if padded else 'per row'}; code predictor "
        + ("compiled" if args.compile else "recorded as CUDA graphs" if recording else "uncompiled"),
    ]
    if args.compile or recording:
        started = time.monotonic()
        runtime.warm_up(max_rows=max(int(r) for r in args.rows.split(",")))
        predictor = runtime.frames.predictor
        worked = predictor.compile if args.compile else predictor.recorder is not None
        lines.append(
            f"- {'compiling' if args.compile else 'recording'} the code predictor (batches up to the largest measured): "
            f"{time.monotonic() - started:.1f} s" + ("" if worked else " (it failed: the steps below ran eagerly)")
        )
        print(lines[-1], flush=True)
    lines += [
        "- step: wall time of one frame step of every row; talker and predictor: the host's time in each (on a GPU "
        "the time to launch their work); prefill: one request's prompt, the mean of the rows' (a round prefills as "
        "many waiting requests as fit in a step's time); codec N: one call decoding an N-frame chunk of every row",
        "",
        "| threads | rows | step (ms) | talker (ms) | predictor (ms) | model alone: frames/s | vs one row | prefill (ms) | "
        + "".join(f"codec {length} (ms) | " for length in chunks).rstrip(),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(chunks),
    ]
    with torch.inference_mode():
        measure_rows(runtime, 1, 1, chunks)  # first calls allocate and load kernels: not in the first row's figures
        for threads in thread_counts:
            torch.set_num_threads(threads)
            single = None
            for rows in [int(r) for r in args.rows.split(",")]:
                m = measure_rows(runtime, rows, args.steps, chunks)
                rate = rows / m["step"] * 1000
                single = single or rate
                lines.append(
                    f"| {threads} | {rows} | {m['step']:.1f} | {m['talker']:.1f} | {m['predictor']:.1f} | {rate:.1f} | "
                    f"{rate / single:.2f}x | {m['prefill']:.1f} | " + "".join(f"{m[f'codec {length}']:.1f} | " for length in chunks).rstrip()
                )
                print(lines[-1], flush=True)
    if args.compile or recording:
        predictor = runtime.frames.predictor
        done = predictor.compiled_frames if args.compile else predictor.recorded_frames
        lines.append(
            f"- frames from the {'compiled loop' if args.compile else 'recorded replays'}: {done} of {runtime.frames.frames_generated}"
        )
    publish(Path(args.output), args.label, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
