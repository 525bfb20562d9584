"""Talker attention for a batch of streams: per row over its own cache, or one padded, masked call.

    python benchmarks/attention_probe.py [--rows 2,4,8] [--threads 1]

The real 0.6B talker's shapes (28 layers, 16 query heads, 8 key/value heads of 128) and rows of
different history lengths, as a batch of streams has. Three ways to attend, per step:

* per row: each row's query against its own cache (`kv_cache.RowCaches`, what the engine does);
* padded, gathered: the rows' keys and values copied into one padded tensor, one masked call;
* padded, pooled: the rows' caches kept in one padded tensor all along (no copy), one masked call.

The linear layers are not part of this: they run batched either way. Writes a section of
BENCHMARKS.md.
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

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 28, 16, 8, 128


def timed(function, repeats: int = 20) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def probe(rows: int, lengths: list[int]) -> dict[str, float]:
    longest = max(lengths)
    caches = [(torch.randn(LAYERS, 1, KV_HEADS, n, HEAD_DIM), torch.randn(LAYERS, 1, KV_HEADS, n, HEAD_DIM)) for n in lengths]
    pool_k = torch.zeros(LAYERS, rows, KV_HEADS, longest, HEAD_DIM)
    pool_v = torch.zeros_like(pool_k)
    for i, (k, v) in enumerate(caches):
        pool_k[:, i, :, : lengths[i]] = k[:, 0]
        pool_v[:, i, :, : lengths[i]] = v[:, 0]
    mask = torch.zeros(rows, 1, 1, longest, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, ..., :n] = True
    q = torch.randn(rows, HEADS, 1, HEAD_DIM)
    scale = HEAD_DIM**-0.5

    def per_row():
        for layer in range(LAYERS):
            torch.cat(
                [
                    F.scaled_dot_product_attention(q[i : i + 1], k[layer], v[layer], scale=scale, enable_gqa=True)
                    for i, (k, v) in enumerate(caches)
                ]
            )

    def padded(gather: bool):
        for layer in range(LAYERS):
            if gather:
                keys = torch.zeros(rows, KV_HEADS, longest, HEAD_DIM)
                values = torch.zeros_like(keys)
                for i, (k, v) in enumerate(caches):
                    keys[i, :, : lengths[i]] = k[layer, 0]
                    values[i, :, : lengths[i]] = v[layer, 0]
            else:
                keys, values = pool_k[layer], pool_v[layer]
            F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)

    with torch.inference_mode():
        return {
            "per row": timed(per_row),
            "padded, gathered": timed(lambda: padded(True)),
            "padded, pooled": timed(lambda: padded(False)),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2,4,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}, {args.threads} thread(s)",
        f"- one talker step's attention over {LAYERS} layers ({HEADS} query heads, {KV_HEADS} key/value heads of "
        f"{HEAD_DIM}); rows of different history lengths (40 to 300 positions); the linear layers are not included",
        "",
        "| rows | per row (ms) | padded, gathered (ms) | padded, pooled (ms) |",
        "|---|---|---|---|",
    ]
    for rows in [int(r) for r in args.rows.split(",")]:
        lengths = [40 + (260 * i) // max(rows - 1, 1) for i in range(rows)]
        result = probe(rows, lengths)
        lines.append(f"| {rows} | " + " | ".join(f"{seconds * 1000:.2f}" for seconds in result.values()) + " |")
    report = "\n".join(lines)
    print(report)
    write_report(Path(args.output), "talker attention for a batch: per row or padded", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
