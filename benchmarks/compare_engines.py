"""Ours against vox-tts on the same checkpoint, same text and frame count, alternating runs.

    python benchmarks/compare_engines.py --checkpoint CKPT --vox-python VENV/bin/python [--frames 40] [--rounds 2]

vox-tts (PyPI `vox-tts`) lives in a scratch virtual environment of its own (VENV): it is not a
dependency of ours. Its converter turns the checkpoint into .tmod files (q8 and q4, cached
next to the checkpoint). Each round runs, one after the other: ours int8, vox q8, ours int4,
vox q4; the best of the rounds is kept. Cost per frame is the utterance's wall time divided by
its frames (prefill included) for both. Writes a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench import machine
from report import write_report

HERE = Path(__file__).resolve().parent
TEXT = (
    "Good evening, the living room lights are dimmed, the front door is locked and the "
    "heating will keep the house at twenty one degrees until tomorrow morning."
)

VOX_RUN = """
import json, sys, time, vox
tmod, frames, threads, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
engine = vox.Engine(tmod, threads=threads)
voice = engine.speaker_voice("ryan")
engine.synthesize(text, voice=voice, max_frames=4, seed=0)  # warm-up
best = None
for _ in range(2):
    started = time.perf_counter()
    audio = engine.synthesize(text, voice=voice, max_frames=frames, seed=0)
    seconds = time.perf_counter() - started
    produced = len(audio) / 1920
    if best is None or seconds / produced < best[0] / best[1]:
        best = (seconds, produced)
stats = engine.stats()["backend"]["ms_per_frame"]
print("RESULT " + json.dumps({"seconds": best[0], "frames": best[1], "split": stats, "rss_mib": engine.stats()["memory"]["peak_rss"] / 2**20}))
"""


def result_of(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])


def ours(checkpoint: str, mode: str, frames: int, threads: int) -> dict:
    command = [sys.executable, str(HERE / "quantize_speed.py"), "--checkpoint", checkpoint, "--frames", str(frames),
               "--one", mode, "--threads", str(threads), "--repeats", "2"]
    row = result_of(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return {"ms_per_frame": 1000 / row["fps"], "split": {k: (v or 0) * 1000 for k, v in row["split"].items()}, "rss_mib": row["rss_mib"]}


def vox_model(vox_python: str, checkpoint: str, quant: str) -> Path:
    out = Path(checkpoint).with_name(f"{Path(checkpoint).name}-vox-{quant}.tmod")
    if not out.exists():
        subprocess.run([vox_python, "-m", "vox", "build", "--model", checkpoint, "--quant", quant, "--no-hash", "-o", str(out)], check=True)
    return out


def vox(vox_python: str, tmod: Path, frames: int, threads: int) -> dict:
    output = subprocess.run([vox_python, "-c", VOX_RUN, str(tmod), str(frames), str(threads), TEXT], capture_output=True, text=True, check=True).stdout
    row = result_of(output)
    return {"ms_per_frame": 1000 * row["seconds"] / row["frames"], "split": row["split"], "rss_mib": row["rss_mib"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--vox-python", required=True, help="python of a virtual environment with vox-tts installed")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE.parent / "BENCHMARKS.md")
    args = parser.parse_args()
    tmods = {quant: vox_model(args.vox_python, args.checkpoint, quant) for quant in ("q8", "q4")}
    version = subprocess.run([args.vox_python, "-c", "import vox; print(vox.__version__)"], capture_output=True, text=True).stdout.strip()
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name, run in (
            ("ours int8", lambda: ours(args.checkpoint, "int8", args.frames, args.threads)),
            (f"vox-tts {version} q8", lambda: vox(args.vox_python, tmods["q8"], args.frames, args.threads)),
            ("ours int4", lambda: ours(args.checkpoint, "int4", args.frames, args.threads)),
            (f"vox-tts {version} q4", lambda: vox(args.vox_python, tmods["q4"], args.frames, args.threads)),
        ):
            row = run()
            print(f"round {round_ + 1}: {name}: {row['ms_per_frame']:.0f} ms per frame", flush=True)
            if name not in best or row["ms_per_frame"] < best[name]["ms_per_frame"]:
                best[name] = row
    reference = best["ours int8"]["ms_per_frame"]
    lines = [
        f"- machine: {machine()}; checkpoint `{Path(args.checkpoint).name}`; {args.frames} frames of the same sentence, "
        f"{args.threads} threads each, best of {args.rounds} alternating rounds (ours through the Wyoming server)",
        "",
        "| engine | ms per frame | relative to ours int8 | talker ms | predictor ms | codec ms | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in best.items():
        split = row["split"]
        lines.append(
            f"| {name} | {row['ms_per_frame']:.0f} | {row['ms_per_frame'] / reference:.2f} | {split.get('talker', 0):.0f} | "
            f"{split.get('predictor', 0):.0f} | {split.get('codec', 0):.0f} | {row['rss_mib']:.0f} |"
        )
    lines += ["", "- ms per frame: the utterance's wall time / its frames, prefill included; vox's split is its own `stats()`."]
    report = "\n".join(lines)
    print(report)
    write_report(args.output, f"quantized weights: ours against vox-tts on {Path(args.checkpoint).name}, CPU", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
