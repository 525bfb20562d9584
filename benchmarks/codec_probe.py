"""The codec's cost per frame by chunk length and by how many streams share a call, on this CPU.

    python benchmarks/codec_probe.py --checkpoint CKPT [--threads 1]

Streams' chunks are short: the first is one frame, later ones up to twelve. For each chunk length
and number of rows (streams decoded in one call), the milliseconds per frame of our streaming
decoder, once with PyTorch's own convolutions and once with the matrix-product kernels of
`engine/codec_kernels.py`; best of three calls, each continuing a stream 24 frames in. Writes a
section of BENCHMARKS.md, named after the memory allocator (run it with and without
`LD_PRELOAD=libtcmalloc_minimal.so.4`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from bench import machine
from report import write_report

from wyoming_qwen3tts.engine import codec_kernels
from wyoming_qwen3tts.engine.allocator import memory_allocator
from wyoming_qwen3tts.engine.decode import StreamingCodecDecoder
from wyoming_qwen3tts.engine.qwen_import import import_qwen_tts

CASES = ((1, 1), (1, 8), (2, 1), (4, 1), (4, 4), (12, 1), (12, 2), (12, 4), (12, 8))  # (frames per chunk, rows)


def per_frame(decoder: StreamingCodecDecoder, frames: int, rows: int, codes: torch.Tensor) -> float:
    states = [decoder.new_state() for _ in range(rows)]
    decoder.decode_batch(states, [codes[:24]] * rows)
    best = float("inf")
    for call in range(3):
        chunk = codes[24 + call * frames : 24 + (call + 1) * frames]
        started = time.perf_counter()
        decoder.decode_batch(states, [chunk] * rows)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / (frames * rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import_qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Model

    codec = Qwen3TTSTokenizerV2Model.from_pretrained(str(args.checkpoint / "speech_tokenizer"), torch_dtype=torch.float32)
    plain_modules = copy.deepcopy(codec.decoder)
    ours = StreamingCodecDecoder(codec.decoder)
    codec_kernels.MIN_WEIGHTS = 2**62  # the second decoder keeps PyTorch's convolutions everywhere
    plain = StreamingCodecDecoder(plain_modules)
    codes = torch.randint(0, 2048, (80, 16), generator=torch.Generator().manual_seed(0))
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; codec of `{args.checkpoint.name}`, {args.threads} thread(s); "
        "ms per frame, best of 3 calls",
        "",
        "| frames per chunk | streams per call | PyTorch's convolutions | ours |",
        "|---|---|---|---|",
    ]
    with torch.inference_mode():
        for frames, rows in CASES:
            cells = [per_frame(decoder, frames, rows, codes) for decoder in (plain, ours)]
            lines.append(f"| {frames} | {rows} | {cells[0]:.1f} | {cells[1]:.1f} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    write_report(args.output, f"codec kernels and batches on {args.checkpoint.name}, CPU, {memory_allocator()} allocator", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
