"""The codec's cost per frame by chunk length and by how many streams share a call, on this CPU.

    python benchmarks/codec_probe.py --checkpoint CKPT [--threads 1] [--against OTHER_CHECKOUT | --precisions]

Streams' chunks are short: the first is one frame, later ones up to twelve. For each chunk length
and number of rows (streams decoded in one call), the milliseconds per frame of our streaming
decoder; best of three calls, each continuing a stream 24 frames in, and for the first row a
stream's very first frame (what first audio waits for). Writes a section of BENCHMARKS.md, named
after the memory allocator (run it with and without `LD_PRELOAD=libtcmalloc_minimal.so.4`).

Without `--against`, one process compares PyTorch's own convolutions and linear layers with the
matrix-product kernels of `engine/codec_kernels.py`. With `--against DIR` (another checkout of this project,
e.g. `git worktree add /tmp/before HEAD~1`), it compares that checkout's decoder with this one's:
each runs in a process of its own, in turns, `--rounds` times, and the best of each is kept.
With `--precisions`, it compares the codec in float32 with the codec in bfloat16
(`--codec-precision`): time per frame, and bfloat16's distance from float32 after each stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from bench import machine
from report import write_report

from wyoming_qwen3tts.engine import codec_kernels
from wyoming_qwen3tts.engine.allocator import memory_allocator
from wyoming_qwen3tts.engine.decode import StreamingCodecDecoder
from wyoming_qwen3tts.engine.loader import cpu_computes_bfloat16
from wyoming_qwen3tts.engine.quantized_linear import snr_db
from wyoming_qwen3tts.engine.qwen_import import import_qwen_tts

FIRST = (1, 0)  # a stream's first frame, on a new state
CASES = (FIRST, (1, 1), (1, 8), (2, 1), (4, 1), (4, 4), (12, 1), (12, 2), (12, 4), (12, 8))  # (frames per chunk, rows)
REPO = Path(__file__).resolve().parents[1]


def per_frame(decoder: StreamingCodecDecoder, frames: int, rows: int, codes: torch.Tensor) -> float:
    if (frames, rows) == FIRST:
        return 1000 * min(_timed(decoder.decode_batch, [decoder.new_state()], [codes[:1]]) for _call in range(3))
    states = [decoder.new_state() for _ in range(rows)]
    decoder.decode_batch(states, [codes[:24]] * rows)
    best = float("inf")
    for call in range(3):
        chunk = codes[24 + call * frames : 24 + (call + 1) * frames]
        best = min(best, _timed(decoder.decode_batch, states, [chunk] * rows))
    return 1000 * best / (frames * rows)


def _timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def case_name(frames: int, rows: int) -> tuple[str, str]:
    return ("1", "1, its first frame") if (frames, rows) == FIRST else (str(frames), str(rows))


def load_codec(checkpoint: Path):
    import_qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Model

    return Qwen3TTSTokenizerV2Model.from_pretrained(str(checkpoint / "speech_tokenizer"), dtype=torch.float32)


def measure_all(checkpoint: Path) -> list[float]:
    """Every case's ms per frame with the decoder of the checkout this process imports."""
    decoder = StreamingCodecDecoder(load_codec(checkpoint).decoder)
    codes = torch.randint(0, 2048, (80, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return [per_frame(decoder, frames, rows, codes) for frames, rows in CASES]


def measured_in(checkout: Path, args) -> list[float]:
    """`measure_all` in a process that imports the project from ``checkout``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--checkpoint", str(args.checkpoint), "--threads", str(args.threads), "--worker"]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the probe failed in {checkout}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkout_name(checkout: Path) -> str:
    """The checkout's commit (with "+" when it has changes), else its folder's name."""
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty=+"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return checkout.name
    return commit.stdout.strip()


def compare_checkouts(args) -> list[str]:
    other, this = args.against.resolve(), REPO
    before, after = checkout_name(other), checkout_name(this)
    best = {other: [float("inf")] * len(CASES), this: [float("inf")] * len(CASES)}
    for round_ in range(args.rounds):
        for checkout in (other, this):
            best[checkout] = [min(a, b) for a, b in zip(best[checkout], measured_in(checkout, args))]
            print(f"round {round_ + 1}: {checkout_name(checkout)} done", flush=True)
    lines = [
        f"| frames per chunk | streams per call | {before} | {after} | {after} / {before} |",
        "|---|---|---|---|---|",
    ]
    for (frames, rows), old, new in zip(CASES, best[other], best[this]):
        lines.append(f"| {' | '.join(case_name(frames, rows))} | {old:.1f} | {new:.1f} | {new / old:.2f} |")
    return lines


def multiply_adds_per_frame(plain: StreamingCodecDecoder, codes: torch.Tensor, frames: int = 12) -> float:
    """Multiply-adds of one frame in a ``frames``-frame chunk, 24 frames into a stream, counted by
    PyTorch's flop counter on a decoder that runs PyTorch's own layers (it cannot see ours, which
    do the same products). Elementwise work (SnakeBeta's sines) is not counted."""
    state = plain.new_state()
    plain.decode_batch([state], [codes[:24]])
    with FlopCounterMode(display=False) as counter:
        plain.decode_batch([state], [codes[24 : 24 + frames]])
    return counter.get_total_flops() / 2 / frames


def compare_kernels(args) -> list[str]:
    codec = load_codec(args.checkpoint)
    plain_modules = copy.deepcopy(codec.decoder)
    ours = StreamingCodecDecoder(codec.decoder)
    codec_kernels.MIN_WEIGHTS = 2**62  # the second decoder keeps PyTorch's convolutions and linear layers everywhere
    plain = StreamingCodecDecoder(plain_modules)
    codes = torch.randint(0, 2048, (80, 16), generator=torch.Generator().manual_seed(0))
    lines = [
        "| frames per chunk | streams per call | PyTorch's convolutions and linear layers | ours | ours: GMAC/s |",
        "|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        macs = multiply_adds_per_frame(plain, codes)
        for frames, rows in CASES:
            cells = [per_frame(decoder, frames, rows, codes) for decoder in (plain, ours)]
            lines.append(f"| {' | '.join(case_name(frames, rows))} | {cells[0]:.1f} | {cells[1]:.1f} | {macs / cells[1] / 1e6:.1f} |")
            print(lines[-1], flush=True)
    lines.append(
        f"- a frame of a 12-frame chunk takes {macs / 1e9:.2f} G multiply-adds (PyTorch's flop counter "
        "over a 12-frame chunk, 24 frames into a stream); GMAC/s: those over ours' time per frame, which says how near the core's "
        "float32 peak the codec runs (an AVX2 core with two FMA units: 16 multiply-adds per cycle)"
    )
    return lines


def stage_outputs(decoder, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of each stage of the package's one-shot decode of ``codes`` [frames, 16], in float32."""
    outputs: dict[str, torch.Tensor] = {}
    stages = [("pre_transformer", decoder.pre_transformer)] + [(f"decoder.{i}", block) for i, block in enumerate(decoder.decoder)]
    handles = []
    for name, module in stages:

        def keep(_module, _args, out, name=name):
            out = getattr(out, "last_hidden_state", out)
            outputs[name] = out.float()

        handles.append(module.register_forward_hook(keep))
    try:
        decoder(codes.T.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def compare_precisions(args) -> list[str]:
    """The codec in float32 against bfloat16 (`--codec-precision`): time per frame, and how far
    bfloat16's output is from float32's at each stage (random weights: say nothing of real ones)."""
    full = load_codec(args.checkpoint).decoder
    half = load_codec(args.checkpoint).decoder.to(torch.bfloat16)
    decoders = (StreamingCodecDecoder(full), StreamingCodecDecoder(half))
    codes = torch.randint(0, 2048, (80, 16), generator=torch.Generator().manual_seed(0))
    lines = ["| frames per chunk | streams per call | float32 | bfloat16 | float32 / bfloat16 |", "|---|---|---|---|---|"]
    with torch.inference_mode():
        for frames, rows in CASES:
            cells = [per_frame(decoder, frames, rows, codes) for decoder in decoders]
            lines.append(f"| {' | '.join(case_name(frames, rows))} | {cells[0]:.1f} | {cells[1]:.1f} | {cells[0] / cells[1]:.2f}x |")
            print(lines[-1], flush=True)
        reference, rounded = stage_outputs(full, codes[:48]), stage_outputs(half, codes[:48])
    stages = ", ".join(f"{name} {snr_db(reference[name], rounded[name]):.1f}" for name in reference)
    lines += [
        "",
        "- signal to difference, bfloat16 against float32, dB, after each stage of a 48-frame one-shot decode "
        f"(the last is the audio): {stages}",
        f"- this CPU computes in bfloat16 (AVX512_BF16 or AMX): {cpu_computes_bfloat16()}",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", type=Path, help="another checkout of this project, to compare its decoder with this one's")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: turns each checkout takes")
    parser.add_argument("--precisions", action="store_true", help="compare the codec in float32 with bfloat16 (--codec-precision)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_all(args.checkpoint)))
        return 0
    lines = compare_checkouts(args) if args.against else compare_precisions(args) if args.precisions else compare_kernels(args)
    against = f"; two checkouts in turns, best of {args.rounds} turns each" if args.against else ""
    header = [
        f"- machine: {machine()}; torch {torch.__version__}; codec of `{args.checkpoint.name}`, {args.threads} thread(s); "
        f"ms per frame, best of 3 calls{against}",
        "",
    ]
    report = "\n".join(header + lines)
    print(report)
    title = f"codec kernels and batches on {args.checkpoint.name}, CPU, {memory_allocator()} allocator"
    if args.precisions:
        title = f"codec precision, float32 against bfloat16, on {args.checkpoint.name}, CPU, {memory_allocator()} allocator"
    if args.against:
        title = f"codec decoder, {checkout_name(args.against.resolve())} against {checkout_name(REPO)}, on {args.checkpoint.name}, CPU, {memory_allocator()} allocator"
    write_report(args.output, title, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
