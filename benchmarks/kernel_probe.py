"""The candidate kernels for linear layers, on a 1024x3072 layer of this CPU.

    python benchmarks/kernel_probe.py [--threads 1]

1 row (one stream's frame step), 2 to 8 rows (a batch of streams) and 40 rows (a prompt):
microseconds per call, cycling through eight copies of the weights so that each call reads them
from memory as a real step does, and the output's signal-to-noise ratio against float32. Float
weights have three kernels: MKL's (F.linear, ours for one stream) and oneDNN's (ours for a batch)
where the CPU lacks AVX-512, and oneDNN's over weights packed once (ours on AVX-512 CPUs).
Writes a section of BENCHMARKS.md.
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

from wyoming_qwen3tts.engine.int4_weights import INT4_GROUP, Int4Weights, KleidiAIInt4Weights, kleidiai_built
from wyoming_qwen3tts.engine.packed_weights import PackedFloatWeights
from wyoming_qwen3tts.engine.quantized_linear import Int8Weights, snr_db

IN, OUT = 1024, 3072
ROWS = (1, 2, 4, 8, 40)
COPIES = 8  # 8 x 12 MB of float32 weights: more than the cache holds


def timed(fn, calls: int) -> float:
    """Microseconds per call, the better of two passes: a kernel's first pass in a process can
    carry one-time costs (oneDNN's packed layout took 1168 us a row in its first pass, 710 in its second)."""
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


def dynamic_int4_path() -> str:
    """Which implementation PyTorch's dynamic 4-bit product has in this build."""
    return "KleidiAI" if kleidiai_built() else "PyTorch's reference path: no KleidiAI in this build"


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

    def onednn():
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, IN), weight, None, "none", [], "")
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

    def packed(dtype: torch.dtype):
        def build():
            layer = PackedFloatWeights(weight.to(dtype), None)
            return lambda x: layer(x.to(dtype))

        return build

    return [
        ("float32 F.linear (MKL; ours for one stream without AVX-512)", lambda: (lambda x: F.linear(x, weight))),
        ("float32 oneDNN linear (ours for a batch of streams without AVX-512)", onednn),
        ("float32 oneDNN linear, weights packed once, 1-3 rows padded to 4 (ours on AVX-512)", packed(torch.float32)),
        ("bfloat16 F.linear", lambda: (lambda x, w=weight.bfloat16(): F.linear(x.bfloat16(), w))),
        ("bfloat16 oneDNN linear, weights packed once, 1-3 rows padded to 4 (ours on AVX-512)", packed(torch.bfloat16)),
        ("fbgemm int8, a grid per row (ours: int8)", lambda: Int8Weights(weight, None)),
        ("torch _weight_int8pack_mm, bfloat16 activations", int8pack),
        ("torch _weight_int4pack_mm_for_cpu, groups of 32 (ours: int4 without KleidiAI)", lambda: Int4Weights(weight, None)),
        ("torch _weight_int4pack_mm_for_cpu, groups of 128", lambda: Int4Weights(weight, None, group=128)),
        (f"torch _dyn_quant_matmul_4bit, int8 activations, groups of {INT4_GROUP} ({dynamic_int4_path()}; ours: int4 with KleidiAI)", lambda: KleidiAIInt4Weights(weight, None)),
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
    weights = [torch.randn(OUT, IN) * 0.02 for _ in range(COPIES)]
    inputs = {rows: torch.randn(rows, IN) for rows in ROWS}
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; a {IN}x{OUT} linear layer ({COPIES} copies, read in turn), "
        f"{args.threads} thread(s); microseconds per call",
        "",
        "| kernel | " + " | ".join(f"{rows} row{'s' if rows > 1 else ''}" for rows in ROWS) + " | SNR (dB) |",
        "|---|" + "---|" * (len(ROWS) + 1),
    ]
    with torch.inference_mode():
        for index, (name, build) in enumerate(candidates(weights[0])):
            try:
                layers = [candidates(w)[index][1]() for w in weights]
                cells = []
                for rows, x in inputs.items():
                    turn = iter(range(10**9))
                    calls = 40 if rows < 40 else 8
                    cells.append(f"{timed(lambda x=x: layers[next(turn) % COPIES](x), calls * COPIES):.0f}")
                snr = snr_db(F.linear(inputs[40], weights[0]), layers[0](inputs[40]).float())
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {snr:.1f} |")
            except Exception as err:  # noqa: BLE001 - a kernel this machine lacks
                lines.append(f"| {name} | not available: {type(err).__name__} |" + " |" * len(ROWS))
            print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    write_report(args.output, f"kernel probe: a linear layer for 1 to 40 rows, {args.threads} thread(s)", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
