"""How much quantized weights change the model, on a random-weight checkpoint (no real weights reach us).

    python benchmarks/quantize_quality.py --checkpoint CKPT [--frames 200] [--modes int8,int4]

1. Per layer: every linear layer of the talker and the code predictor, fed the activations it
   sees in a real generation (recorded from the stock path), float output against the
   quantized kernel's output: signal-to-noise ratio in dB.
2. Over ``--frames`` teacher-forced frames (the float model's greedy codes fed back to every
   model): per codebook, the mean KL divergence of the quantized model's distribution from the
   float one, and the share of frames whose greedy code is the same.

Prints the tables and writes a section of BENCHMARKS.md. The kernels are named in the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from report import write_report

from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.loader import load_model, resolve_placement
from wyoming_qwen3tts.engine.options import LoadOptions
from wyoming_qwen3tts.engine.predictor import PredictorSampling
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.engine.quantize import kernel_for
from wyoming_qwen3tts.engine.quantized_linear import PreparedLinear, snr_db
from wyoming_qwen3tts.speech import PresetSpeaker, SamplingOptions

TEXT = "Good evening, the living room lights are dimmed and the front door is locked."
GREEDY_PREDICTOR = PredictorSampling.of(SamplingOptions().greedy())
CALLS_PER_LAYER = 6  # recorded inputs per layer (the predictor's layers run 15 times a frame)


def load(checkpoint: Path, mode: str):
    placement = resolve_placement(LoadOptions(device="cpu", quantize=mode, threads=2))
    # The float reference is the package's own layers (on an AVX-512 CPU the server would pack them).
    return load_model(checkpoint, dataclasses.replace(placement, packed_float_weights=False))


def recorded_inputs(wrapper) -> dict[str, tuple[torch.nn.Linear, list[torch.Tensor]]]:
    """The inputs of every linear layer during a short stock generation."""
    recorded: dict[str, tuple[torch.nn.Linear, list[torch.Tensor]]] = {}
    handles = []
    for name, module in wrapper.model.talker.named_modules():
        if type(module) is torch.nn.Linear:
            recorded[name] = (module, [])

            def hook(mod, args, name=name):
                calls = recorded[name][1]
                if len(calls) < CALLS_PER_LAYER:
                    calls.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

            handles.append(module.register_forward_pre_hook(hook))
    try:
        wrapper.generate_custom_voice(TEXT, speaker="ryan", language="english", max_new_tokens=4, do_sample=False, subtalker_dosample=False)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def layer_snrs(recorded, mode: str) -> dict[str, float]:
    kernel = kernel_for(mode)
    snrs = {}
    with torch.inference_mode():
        for name, (module, inputs) in recorded.items():
            if not inputs:
                continue
            try:
                weights = kernel(module.weight, module.bias)
            except ValueError:
                continue
            x = torch.cat(inputs)
            snrs[name] = snr_db(F.linear(x, module.weight, module.bias), weights(x))
    return snrs


def predictor_logits(loop, hidden: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Logits [15, vocab] of codebooks 1-15 with ``frame``'s own codes fed back (teacher forcing)."""
    cache = loop.new_cache(1)
    embeds = torch.cat((hidden, F.embedding(frame[0:1], loop.code0_table).unsqueeze(1)), dim=1)
    logits = []
    for step in range(loop.steps):
        if step > 0:
            embeds = F.embedding(frame[step : step + 1], loop.tables[step - 1]).unsqueeze(1)
        end = cache.length + embeds.shape[1]
        out = loop.stack.forward(loop.project(embeds), loop.cos[:, :, cache.length : end], loop.sin[:, :, cache.length : end], cache)
        logits.append(loop.heads[step](out[:, -1]).float()[0])
    return torch.stack(logits)


def teacher_forced(wrapper, codes: torch.Tensor | None, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codebook-0 logits [T, V0], codebook 1-15 logits [T, 15, V], the codes fed) for ``frames`` frames.

    With ``codes`` None the model's own greedy codes are generated and fed back.
    """
    generator = FrameGenerator(wrapper.model)
    greedy = SamplingOptions().greedy()
    prompt = build_prompt(wrapper, TEXT, PresetSpeaker("ryan"), "english", non_streaming_mode=True)
    state = generator.prefill(prompt, greedy, frames + 1)
    first, rest, fed = [], [], []
    with torch.inference_mode():
        for t in range(frames):
            logits0 = generator.talker.codec_head(state.last_hidden[:, -1]).float()[0]
            logits0 = logits0.masked_fill(generator.suppressed | generator.eos_mask, -float("inf"))
            code0 = logits0.argmax().view(1) if codes is None else codes[t, :1]
            frame = codes[t] if codes is not None else None
            if frame is None:
                rest_codes = generator.predictor.codes(state.last_hidden, code0, [GREEDY_PREDICTOR], [None])
                frame = torch.cat((code0, rest_codes[0]))
            first.append(logits0)
            rest.append(predictor_logits(generator.predictor, state.last_hidden, frame))
            fed.append(frame)
            generator.force(state, frame)
    return torch.stack(first), torch.stack(rest), torch.stack(fed)


def compare(reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[float, float]]:
    """Per codebook (0-15): mean KL(float || quantized) in nats, and the share of equal greedy codes."""
    rows = []
    for book in range(16):
        p = reference[0] if book == 0 else reference[1][:, book - 1]
        q = other[0] if book == 0 else other[1][:, book - 1]
        log_p, log_q = F.log_softmax(p, dim=-1), F.log_softmax(q, dim=-1)
        finite = torch.isfinite(log_p)
        kl = torch.where(finite, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p)).sum(-1)
        rows.append((float(kl.mean()), float((p.argmax(-1) == q.argmax(-1)).float().mean())))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--modes", default="int8,int4")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--label", default=None)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    torch.set_num_threads(2)

    float_model = load(args.checkpoint, "none")
    recorded = recorded_inputs(float_model)
    snrs = {mode: layer_snrs(recorded, mode) for mode in modes}
    del recorded
    print("teacher forcing: float", flush=True)
    float_first, float_rest, codes = teacher_forced(float_model, None, args.frames)
    del float_model
    results = {}
    for mode in modes:
        print(f"teacher forcing: {mode}", flush=True)
        model = load(args.checkpoint, mode)
        assert any(isinstance(m, PreparedLinear) for m in model.model.talker.modules())
        first, rest, _ = teacher_forced(model, codes, args.frames)
        results[mode] = compare((float_first, float_rest), (first, rest))
        del model

    lines = [
        f"- checkpoint `{args.checkpoint.name}` (random weights, real 0.6B dimensions), CPU, torch {torch.__version__}",
        "- kernels: " + "; ".join(f"{mode}: {kernel_for(mode).kernel()}" for mode in modes),
        f"- per layer: every linear layer of talker and code predictor that the kernel takes, "
        f"on the activations of a stock greedy generation (up to {CALLS_PER_LAYER} calls each)",
        "",
        "| weights | layers | min SNR (dB) | median SNR (dB) | worst layer |",
        "|---|---|---|---|---|",
    ]
    for mode in modes:
        values = snrs[mode]
        worst = min(values, key=values.get)
        lines.append(f"| {mode} | {len(values)} | {values[worst]:.1f} | {statistics.median(values.values()):.1f} | `{worst}` |")
    lines += [
        "",
        f"- teacher-forced: {args.frames} frames of the float model's greedy codes fed back to each model",
        "",
        "| codebook | " + " | ".join(f"{m} KL (nats) | {m} same greedy code" for m in modes) + " |",
        "|---|" + "---|---|" * len(modes),
    ]
    for book in range(16):
        cells = " | ".join(f"{results[m][book][0]:.4f} | {results[m][book][1]:.1%}" for m in modes)
        lines.append(f"| {book} | {cells} |")
    means = " | ".join(
        f"{statistics.mean(r[0] for r in results[m]):.4f} | {statistics.mean(r[1] for r in results[m]):.1%}" for m in modes
    )
    lines.append(f"| mean | {means} |")
    report = "\n".join(lines)
    print(report)
    write_report(args.output, args.label or f"quantized weights: quality on {args.checkpoint.name}", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
