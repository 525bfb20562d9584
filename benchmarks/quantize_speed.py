"""Frame cost by weight format: float32, bfloat16, int8, int4, on one checkpoint, one run.

    python benchmarks/quantize_speed.py --checkpoint CKPT [--frames 50] [--modes none,bfloat16,int8,int4]

Modes `int8-compiled` and `int4-compiled` also hand the code predictor to torch.compile (the compile
happens while loading, before anything is timed; set TORCHINDUCTOR_CACHE_DIR to reuse one).

Each setting runs in a process of its own (clean memory figures), through the Wyoming server:
first audio, frames per second, the frame split into talker, code predictor and codec (the codec
decodes on its own thread), RSS, and the bytes of weights one frame reads against the machine's
measured read bandwidth (the floor a bandwidth-bound frame cannot beat). Writes a section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import wyoming_qwen3tts  # noqa: F401 - first: it sets OpenMP's defaults before torch loads
import torch
from bench import ServerThread, _free_port, machine, rss_mib, sentence_tokens, silence_end_of_speech
from child_result import print_result, run_child
from report import write_report
from wyoming_clients import FRAME_SECONDS, one_stream, one_streamed

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.engine.quantize import kernel_for
from wyoming_qwen3tts.engine.quantized_linear import PreparedLinear
from wyoming_qwen3tts.server.app import WyomingOptions
from wyoming_qwen3tts.settings import Settings

SETTINGS = {  # name -> (dtype, quantize, compile the code predictor)
    "none": ("float32", "none", False),
    "bfloat16": ("bfloat16", "none", False),
    "int8": ("float32", "int8", False),
    "int4": ("float32", "int4", False),
    "int8-compiled": ("float32", "int8", True),
    "int4-compiled": ("float32", "int4", True),
}


def linear_bytes(module: torch.nn.Module) -> int:
    if isinstance(module, PreparedLinear):
        return module.weights.nbytes
    return module.weight.numel() * module.weight.element_size()


def bytes_per_frame(talker: torch.nn.Module) -> int:
    """Weight bytes one frame reads: the talker's layers and head once, the code predictor's layers 15 times."""
    predictor = talker.code_predictor
    total = 0
    for name, module in talker.named_modules():
        if not isinstance(module, (torch.nn.Linear, PreparedLinear)) or name.startswith(("code_predictor", "text_projection")):
            continue
        total += linear_bytes(module)
    steps = len(predictor.lm_head)
    for name, module in predictor.named_modules():
        if isinstance(module, (torch.nn.Linear, PreparedLinear)) and not name.startswith("lm_head"):
            total += steps * linear_bytes(module)
    total += sum(linear_bytes(head) for head in predictor.lm_head)  # one head per step
    return total


def read_bandwidth(threads: int) -> float:
    """Bytes per second ``threads`` threads read streaming through 1 GiB: the faster of summing a
    tensor and a one-row float32 matrix product (best of 3 each).

    The product is how a frame step reads weights; on an Intel Xeon VM MKL's kernel streamed a
    matrix 1.35x as fast as PyTorch's sum.
    """
    torch.set_num_threads(threads)
    data = torch.ones(1 << 28)
    matrix, row = data.view(1 << 15, 1 << 13), torch.ones(1, 1 << 13)
    best = float("inf")
    for read in (data.sum, lambda: torch.nn.functional.linear(row, matrix)):
        for _ in range(3):
            started = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def one_setting(args) -> dict:
    dtype, quantize, compile = SETTINGS[args.one]
    load = LoadOptions(device="cpu", dtype=dtype, quantize=quantize, threads=args.threads, compile=compile)
    stop = StopRules(base_frames=args.frames, frames_per_token=0, max_frames=args.frames)
    before = rss_mib()
    started = time.perf_counter()
    engine = SpeechEngine.load(EngineOptions(model=args.checkpoint, load=load, stop=stop))
    load_seconds = time.perf_counter() - started
    runtime = engine.runtimes["custom_voice"]
    rss = rss_mib() - before
    silence_end_of_speech(engine)
    port = _free_port()
    server = ServerThread(engine, Settings(wyoming=WyomingOptions(uri=f"tcp://127.0.0.1:{port}")))
    asyncio.run(one_stream(port, "Ryan"))  # warm-up
    best = None
    for _ in range(args.repeats):
        runtime.frames.timings.reset()
        runtime.decoder.timings.reset()
        result = asyncio.run(one_stream(port, "Ryan"))
        split = {stage: runtime.frames.timings.per_frame(stage) for stage in ("talker", "predictor")}
        split["codec"] = runtime.decoder.timings.per_frame("codec")
        if best is None or result.total < best[0].total:
            best = (result, split)
    streamed = min(asyncio.run(one_streamed(port, "Ryan")) for _ in range(args.repeats))
    server.stop()
    result, split = best
    talker = runtime.wrapper.model.talker
    engine.close()
    return {
        "setting": args.one,
        "threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "first_audio": result.first_audio,
        "first_audio_streamed": streamed,
        "total": result.total,
        "fps": result.frames_per_second,
        "split": split,
        "rss_mib": rss,
        "bytes_per_frame": bytes_per_frame(talker),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--modes", default="none,bfloat16,int8,int4")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: the server's default per setting)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", choices=tuple(SETTINGS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    if args.one:
        print_result(one_setting(args))
        return 0

    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        command = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--frames", str(args.frames), "--one", mode,
                   "--threads", str(args.threads), "--repeats", str(args.repeats)]
        rows.append(run_child(command))
        print(f"{mode}: {rows[-1]['fps']:.2f} frames/s", flush=True)
    # The floor is the machine's: a round that starts while the codec idles runs the model on
    # every core, so a frame may read its weights at the all-core rate.
    bandwidth = {threads: read_bandwidth(threads) for threads in range(1, (os.cpu_count() or 1) + 1)}
    machine_bandwidth = max(bandwidth.values())

    base = next((row for row in rows if row["setting"] == "none"), rows[0])
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; checkpoint `{Path(args.checkpoint).name}`, {args.frames}-frame utterance "
        f"({args.frames * FRAME_SECONDS:.1f} s of audio) through the Wyoming server, end-of-speech code off, best of {args.repeats}; {sentence_tokens(args.checkpoint)}",
        "- kernels: " + "; ".join(f"{mode}: {kernel_for(mode).kernel()}" for mode in ("int8", "int4")),
        "- read bandwidth (1 GiB, summed or multiplied by one row, the faster): " + ", ".join(f"{t} thread{'s' * (t > 1)} {b / 1e9:.1f} GB/s" for t, b in bandwidth.items()),
        "",
        "| weights | threads | ms per frame | frames/s | vs float32 | first audio (ms) | streamed: first audio (ms) | talker ms | predictor ms | codec ms | weights read per frame | floor ms | step / floor | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        split = row["split"]
        step = (split["talker"] or 0) + (split["predictor"] or 0)
        floor = row["bytes_per_frame"] / machine_bandwidth
        lines.append(
            f"| {row['setting']} | {row['threads']} | {1000 / row['fps']:.0f} | {row['fps']:.2f} | {row['fps'] / base['fps']:.2f}x | "
            f"{row['first_audio'] * 1000:.0f} | {row['first_audio_streamed'] * 1000:.0f} | {split['talker'] * 1000:.0f} | {split['predictor'] * 1000:.0f} | "
            f"{(split['codec'] or 0) * 1000:.0f} | {row['bytes_per_frame'] / 2**20:.0f} MiB | {floor * 1000:.0f} | {step / floor:.2f} | {row['rss_mib']:.0f} |"
        )
    lines += [
        "",
        "- first audio: from `synthesize` (the whole sentence enters the prompt up front, the package's way for preset "
        "speakers); streamed: from the text's `synthesize-chunk`, as Home Assistant streams a reply (the text enters word "
        "by word, dual track: a prompt of a few positions); best of the repeats.",
        "- ms per frame: wall time of the whole utterance / frames (includes the first chunk's prefill); "
        "talker and predictor: their share of a frame step on the model thread; codec: decoding per frame, on its own thread, "
        "overlapping the next frames; threads: the model's when the codec is busy (a round that starts while it idles "
        "runs on every core); floor: weights read per frame / the best read bandwidth of all cores; step / floor: "
        "(talker + predictor) / floor.",
    ]
    report = "\n".join(lines)
    print(report)
    write_report(args.output, args.label or f"quantized weights: speed on {Path(args.checkpoint).name}, CPU", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
