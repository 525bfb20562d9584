"""Run inside an aarch64 Python (see script/arm64-check): do the quantized kernels give right
products there, which int8 engine and int4 kernel does the loader settle on, and do the add-on's
default (`--quantize auto`) and `--quantize int4` speak?

    python arm64_check.py CHECKPOINT

Prints what it found; exits 1 when a setting cannot speak, or two greedy runs differ.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.engine.quantize import kernel_for
from wyoming_qwen3tts.engine.int4_weights import arm_dot_product, int4_kernels
from wyoming_qwen3tts.engine.quantized_linear import Int8Weights, kernel_fault
from wyoming_qwen3tts.speech import PresetSpeaker, RequestOptions, SamplingOptions


def report_kernels() -> None:
    default = torch.backends.quantized.engine
    print(f"{platform.machine()}, torch {torch.__version__}, quantized engines {torch.backends.quantized.supported_engines}")
    for engine in torch.backends.quantized.supported_engines:
        if engine == "none":
            continue
        torch.backends.quantized.engine = engine
        print(f"int8 on {engine}{' (default)' if engine == default else ''}: {kernel_fault(Int8Weights) or 'right'}")
    torch.backends.quantized.engine = default
    print(f"8-bit dot product (asimddp): {arm_dot_product()}")
    for kernel in int4_kernels():
        print(f"int4 on {kernel.kernel()}: {kernel.cannot_run() or kernel_fault(kernel) or 'right'}")
    print(f"int4 kernel in use: {kernel_for('int4').kernel()}")


async def speak_twice(checkpoint: Path, quantize: str) -> bool:
    print(f"--quantize {quantize}:")
    with tempfile.TemporaryDirectory() as data:
        options = EngineOptions(
            model=str(checkpoint),
            data_dir=Path(data),
            load=LoadOptions(device="cpu", quantize=quantize),
            stop=StopRules(base_frames=6, frames_per_token=0, max_frames=6),
        )
        engine = SpeechEngine.load(options)
        try:
            print(f"int8 engine in use: {torch.backends.quantized.engine}")
            greedy = RequestOptions(sampling=SamplingOptions().greedy())
            runs = []
            for _ in range(2):
                chunks = [chunk.audio async for chunk in engine.synthesize(["Hello there."], PresetSpeaker("Ryan"), greedy)]
                runs.append(np.concatenate(chunks).tobytes() if chunks else b"")
        finally:
            engine.close()
    print(f"spoke {len(runs[0])} and {len(runs[1])} bytes; the same audio: {runs[0] == runs[1]}")
    return bool(runs[0]) and runs[0] == runs[1]


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report_kernels()
    spoke = [asyncio.run(speak_twice(Path(sys.argv[1]), quantize)) for quantize in ("auto", "int4")]
    return 0 if all(spoke) else 1


if __name__ == "__main__":
    sys.exit(main())
