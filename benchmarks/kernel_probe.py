"""The candidate kernels for quantized linear layers, on one 1024x3072 layer of this CPU.

    python benchmarks/kernel_probe.py [--threads 1]

Batch of one row (a frame step) and of 40 rows (a prompt): microseconds per call and output
signal-to-noise ratio against float32. Writes a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench import machine
from report import write_report

from wyoming_qwen3tts.engine.quantized_linear import Int4Weights, Int8Weights

IN, OUT = 1024, 3072


def timed(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def candidates(weight: torch.Tensor):
    """(name, build) pairs; build returns a callable x -> y, or raises when the kernel is missing."""

    def torchao(config_name: str):
        def build():
            import torchao.quantization as tq

            layer = torch.nn.Linear(IN, OUT, bias=False)
            layer.weight.data = weight.clone()
            tq.quantize_(layer, getattr(tq, config_name)())
            return layer

        return build

    def int8pack():
        scales = weight.abs().amax(1) / 127
        codes = torch.round(weight / scales[:, None]).to(torch.int8)
        return lambda x: torch._weight_int8pack_mm(x.bfloat16(), codes, scales.bfloat16())

    return [
        ("float32 F.linear", lambda: (lambda x: F.linear(x, weight))),
        ("bfloat16 F.linear", lambda: (lambda x, w=weight.bfloat16(): F.linear(x.bfloat16(), w))),
        ("fbgemm dynamic int8 (ours: int8)", lambda: Int8Weights(weight, None)),
        ("torch _weight_int8pack_mm, bfloat16 activations", int8pack),
        ("torch _weight_int4pack_mm_for_cpu, groups of 32 (ours: int4)", lambda: Int4Weights(weight, None)),
        ("torchao Int8WeightOnlyConfig", torchao("Int8WeightOnlyConfig")),
        ("torchao Int8DynamicActivationInt8WeightConfig", torchao("Int8DynamicActivationInt8WeightConfig")),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN) * 0.02
    inputs = {1: torch.randn(1, IN), 40: torch.randn(40, IN)}
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; one {IN}x{OUT} linear layer, {args.threads} thread(s)",
        "",
        "| kernel | 1 row (us) | 40 rows (us) | SNR (dB) |",
        "|---|---|---|---|",
    ]
    with torch.inference_mode():
        for name, build in candidates(weight):
            try:
                layer = build()
                cells = [f"{timed(lambda x=x: layer(x), 200 if rows == 1 else 20):.0f}" for rows, x in inputs.items()]
                reference = F.linear(inputs[40], weight)
                noise = (layer(inputs[40]).float() - reference).pow(2).sum()
                snr = float(10 * torch.log10(reference.pow(2).sum() / noise)) if noise > 0 else float("inf")
                lines.append(f"| {name} | {cells[0]} | {cells[1]} | {snr:.1f} |")
            except Exception as err:  # noqa: BLE001 - a kernel this machine lacks
                lines.append(f"| {name} | not available: {type(err).__name__} | | |")
            print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    write_report(args.output, f"quantized weights: kernel probe, {args.threads} thread(s)", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
