"""PyTorch operators one batched frame step dispatches, by stage, per row or with padded attention.

    python benchmarks/step_operators.py --checkpoint CKPT [--rows 1,4,8,16]

On a GPU a step of the 0.6B model is made of host work: each operator costs Python and
dispatch time, and those that compute launch a kernel, whatever their size. The count does not
depend on the device (but for a few operators a device's kernels split or fuse), so this runs
on the CPU and shows where a step's host work goes: the talker (per row or padded attention,
`EngineOptions.batch_attention`) and the code predictor's 15 steps (which `--compile` turns
into one CUDA graph on a GPU). Writes a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from bench import machine
from report import publish
from wyoming_clients import TEXT

from wyoming_qwen3tts.dev.operator_count import OperatorCount
from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.loader import LoadOptions, load_model, resolve_placement
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.engine.sampling import SamplingOptions
from wyoming_qwen3tts.speech import PresetSpeaker


def operators(wrapper, rows: int, padded: bool) -> Counter[str]:
    """Operators of one step of ``rows`` streams (each a few frames in, at its own length)."""
    generator = FrameGenerator(wrapper.model, padded_attention=padded)
    sampling = SamplingOptions.from_generation_config(wrapper.generate_defaults)
    speakers = list(wrapper.model.config.talker_config.spk_id)
    words = TEXT.split()
    states = [
        # Prompts of different lengths, as a batch of streams has.
        generator.prefill(build_prompt(wrapper, " ".join(words[: 6 + i]), PresetSpeaker(speakers[i % len(speakers)]), "english"), sampling, 1000)
        for i in range(rows)
    ]
    for _ in range(2):
        generator.step(states)
    count = OperatorCount()
    generator._advance_talker = count.staged("talker", generator._advance_talker)
    generator.predictor.codes = count.staged("code predictor", generator.predictor.codes)
    with count:
        generator.step(states)
    return count.by_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="CustomVoice checkpoint folder")
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--label", default="operators per batched step")
    args = parser.parse_args(argv)
    wrapper = load_model(Path(args.checkpoint), resolve_placement(LoadOptions(device="cpu", quantize="none")))
    lines = [
        f"- machine: {machine()}; torch {torch.__version__}; checkpoint `{Path(args.checkpoint).name}`, float32 weights",
        "- PyTorch operators dispatched by one frame step of every row (views included), by stage; nearly the "
        "same on any device (a device's kernels may split or fuse a few)",
        "",
        "| rows | per row: talker | per row: code predictor | per row: step | padded: talker | padded: code predictor | padded: step |",
        "|---|---|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            cells = []
            for padded in (False, True):
                counts = operators(wrapper, rows, padded)
                cells += [counts["talker"], counts["code predictor"], sum(counts.values())]
            lines.append(f"| {rows} | " + " | ".join(str(c) for c in cells) + " |")
    publish(Path(args.output), args.label, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
