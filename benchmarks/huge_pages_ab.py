"""Frame steps of a model in huge pages against the same model in small pages, in one process.

    python benchmarks/huge_pages_ab.py --checkpoint CKPT [--quantize int8] [--steps 20] [--rounds 3]

Each round starts two processes in turn. Each loads the checkpoint twice, as two models; in
one, the memory is moved into huge pages as the server does after loading
(`engine/huge_pages.py`) between the two loads, so the first model is in huge pages and the
second in small ones; in the other (the control) nothing happens between them. Then each
process steps one stream of each model in turn, ``--steps`` times, and compares the first
model's median step with the second's: the two are measured in the same seconds, so the VM's
drift cancels. The control's ratio says what loading first does by itself; the huge pages'
share is the one ratio divided by the other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import wyoming_qwen3tts  # noqa: F401 - first: it sets OpenMP's defaults before torch loads
import torch
from bench import machine
from child_result import print_result, run_child
from report import publish
from wyoming_clients import TEXT

from wyoming_qwen3tts.engine.huge_pages import collapse_resident_memory
from wyoming_qwen3tts.engine.loader import LoadOptions, load_model, resolve_placement
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.engine.runtime import ModelRuntime
from wyoming_qwen3tts.speech import PresetSpeaker


def anonymous_huge_mib() -> float:
    with open("/proc/self/smaps_rollup", encoding="ascii") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages")) / 1024


def one_process(args) -> dict:
    """Two models of one checkpoint, the first moved into huge pages (or not), stepped in turn."""
    torch.set_num_threads(args.threads)
    placement = resolve_placement(LoadOptions(device="cpu", quantize=args.quantize, threads=args.threads))

    def load() -> tuple[ModelRuntime, object]:
        wrapper = load_model(Path(args.checkpoint), placement)
        runtime = ModelRuntime.create(wrapper)
        speaker = PresetSpeaker(list(wrapper.model.config.talker_config.spk_id)[0])
        return runtime, runtime.frames.prefill(build_prompt(wrapper, TEXT, speaker, "english"), runtime.sampling, 100_000)

    with torch.inference_mode():
        first = load()
        moved = collapse_resident_memory() if args.one == "huge" else None
        second = load()
        times: dict[int, list[float]] = {0: [], 1: []}
        for runtime, state in (first, second):
            for _ in range(2):  # first calls allocate
                runtime.frames.step([state])
        for step in range(2 * args.steps):
            model = step % 2 if step // 2 % 2 == 0 else 1 - step % 2  # ABBA: neither always goes first
            runtime, state = (first, second)[model]
            started = time.perf_counter()
            runtime.frames.step([state])
            times[model].append(time.perf_counter() - started)
    return {
        "kind": args.one,
        "first": statistics.median(times[0]) * 1000,
        "second": statistics.median(times[1]) * 1000,
        "moved_mib": moved.moved_bytes / 2**20 if moved else 0.0,
        "collapse_s": moved.seconds if moved else 0.0,
        "huge_mib": anonymous_huge_mib(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps timed of each model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=("huge", "control"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    if args.one:
        print_result(one_process(args))
        return 0

    rows = []
    for round_ in range(1, args.rounds + 1):
        kinds = ("huge", "control") if round_ % 2 else ("control", "huge")
        for kind in kinds:
            command = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--quantize", args.quantize,
                       "--threads", str(args.threads), "--steps", str(args.steps), "--one", kind]
            row = run_child(command)
            rows.append({"round": round_, **row})
            print(f"round {round_} {kind}: {row['first']:.1f} against {row['second']:.1f} ms", flush=True)

    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; checkpoint `{Path(args.checkpoint).name}`, weights "
        f"{args.quantize}, {args.threads} thread(s); one stream's frame step, the models alone (no codec beside them), "
        f"median of {args.steps} steps of each model, the two models' steps in turn; each round's two processes in turn, "
        "the order swapped every round",
        "",
        "| round | between the two loads | first model's step (ms) | second model's step (ms) | first / second | moved (MiB) | took (s) | huge pages after (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['round']} | {'huge pages' if row['kind'] == 'huge' else 'nothing'} | {row['first']:.1f} | "
            f"{row['second']:.1f} | {row['first'] / row['second']:.3f} | {row['moved_mib']:.0f} | {row['collapse_s']:.1f} | "
            f"{row['huge_mib']:.0f} |"
        )
    ratios = {kind: statistics.median(r["first"] / r["second"] for r in rows if r["kind"] == kind) for kind in ("huge", "control")}
    lines += [
        "",
        f"- median first / second: the first in huge pages {ratios['huge']:.3f}, both in small pages {ratios['control']:.3f}: "
        f"a step in huge pages takes {ratios['huge'] / ratios['control']:.3f} of its time in small pages",
    ]
    publish(args.output, args.label or f"huge pages, the model alone: {Path(args.checkpoint).name}, {args.quantize}, CPU", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
