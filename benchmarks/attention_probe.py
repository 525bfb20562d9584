"""Talker attention for a batch of streams: per row over its own cache, or one padded, masked call.

    python benchmarks/attention_probe.py [--rows 2,4,8,16] [--threads 1] [--device cpu]

The real 0.6B talker's shapes (28 layers, 16 query heads, 8 key/value heads of 128) and rows of
different history lengths, as a batch of streams has. The engine's two ways for one step of the
batch (`EngineOptions.batch_attention`), each writing the step's keys and attending, every layer:

* per row: each row writes into and attends to its own cache (`kv_cache.RowCaches`);
* padded: the rows' histories are slots of one padded tensor (`kv_cache.PaddedRows`): one write
  for all rows, one masked call.

Besides the time, the PyTorch operators each way dispatches per step: on a GPU each one costs
host time (and those that compute, a kernel launch), which is what a step of a small model there
is made of. The linear layers are not part of this: they run batched either way. Writes a
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from bench import machine
from report import publish

from wyoming_qwen3tts.dev.operator_count import OperatorCount
from wyoming_qwen3tts.engine.kv_cache import KVSlots, PaddedRows, RowCaches, StaticKVCache

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 28, 16, 8, 128


def timed(function, device: torch.device, repeats: int = 20) -> float:
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / repeats


def probe(lengths: list[int], device: torch.device, dtype: torch.dtype) -> dict[str, tuple[float, int]]:
    """{way: (seconds per step, operators per step)} for rows with ``lengths`` positions so far."""
    rows = len(lengths)
    capacity = max(lengths) + 64
    own = [StaticKVCache(LAYERS, KV_HEADS, HEAD_DIM, capacity, dtype, device) for _ in lengths]
    slots = KVSlots(LAYERS, KV_HEADS, HEAD_DIM, dtype, device, slots=rows, capacity=capacity)
    pooled = [slots.take(capacity) for _ in lengths]
    for length, mine, slot in zip(lengths, own, pooled):
        mine.advance(length)
        slot.advance(length)
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(rows, KV_HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    scale = HEAD_DIM**-0.5

    def step(batch) -> None:
        for layer in range(LAYERS):
            batch.attend(layer, q, k, v, scale)

    ways = {"per row": lambda: step(RowCaches(own)), "padded": lambda: step(PaddedRows(pooled))}
    results = {}
    with torch.inference_mode():
        for name, function in ways.items():
            counter = OperatorCount()
            with counter:
                function()
            results[name] = (timed(function, device), counter.calls)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2,4,8,16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--label", default="talker attention for a batch: per row or padded")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; on {where}, {str(dtype).removeprefix('torch.')}",
        f"- one talker step's attention over {LAYERS} layers ({HEADS} query heads, {KV_HEADS} key/value heads of "
        f"{HEAD_DIM}), writing the step's keys and values included; rows of different history lengths (40 to 300 "
        "positions); the linear layers are not included; operators: PyTorch operators dispatched per step, views "
        "included (on a GPU each one costs host time, and those that compute launch a kernel)",
        "",
        "| rows | per row (ms) | padded (ms) | per row: operators | padded: operators |",
        "|---|---|---|---|---|",
    ]
    for rows in [int(r) for r in args.rows.split(",")]:
        lengths = [40 + (260 * i) // max(rows - 1, 1) for i in range(rows)]
        result = probe(lengths, device, dtype)
        (row_s, row_ops), (pad_s, pad_ops) = result["per row"], result["padded"]
        lines.append(f"| {rows} | {row_s * 1000:.2f} | {pad_s * 1000:.2f} | {row_ops} | {pad_ops} |")
    publish(Path(args.output), args.label, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
