"""Ours against other Qwen3-TTS engines on the same checkpoint, same text and frame count, alternating runs.

    python benchmarks/compare_engines.py --checkpoint CKPT [--vox-python VENV/bin/python]
        [--qwentts-python VENV/bin/python --qwentts-convert QWENTTS_REPO/convert.py] [--frames 40] [--rounds 2]

The other engines live in scratch virtual environments of their own: they are not dependencies
of ours.
- vox-tts (PyPI `vox-tts`): its converter turns the checkpoint into .tmod files (q8 and q4).
- qwentts.cpp (PyPI `realtimetts-qwen-native-cpu`, the ggml library and its Python binding): its
  wheel ships no converter, so the `convert.py` of its repository (github.com/ServeurpersoCom/
  qwentts.cpp) writes the GGUF files, and the quantizing follows its `tools/quantize.cpp` (which
  the wheel does not ship either): Q8_0 as its Q8_0 (every matrix, embeddings too), and Q4_0 for
  4 bits. Its own 4-bit choice, Q4_K_M (embeddings and some layers at 6 bits), has no quantizer
  in the `gguf` package; Q4_0 is ggml's plain 4-bit format. Its venv needs `gguf`, `safetensors`
  and `torch` besides the wheel.
Model files are cached next to the checkpoint. Each round runs, one after the other, for 8 and
then 4 bits: ours, vox, qwentts.cpp; the best of the rounds is kept. Every engine streams the
sentence given up front; cost per frame is the utterance's wall time divided by its frames
(prefill included), first audio the time to its first chunk. Writes a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bench import machine
from child_result import run_child
from report import write_report
from wyoming_clients import TEXT

HERE = Path(__file__).resolve().parent

VOX_RUN = """
import json, sys, time, vox
tmod, frames, threads, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
engine = vox.Engine(tmod, threads=threads)
voice = engine.speaker_voice("ryan")
engine.synthesize(text, voice=voice, max_frames=4, seed=0)  # warm-up
best = None
for _ in range(2):
    started, first, samples = time.perf_counter(), None, 0
    for chunk in engine.stream(text, voice=voice, max_frames=frames, seed=0):
        first = first or time.perf_counter() - started
        samples += len(chunk)
    seconds = time.perf_counter() - started
    if best is None or seconds / samples < best[0] / best[1]:
        best = (seconds, samples, first)
stats = engine.stats()
print("RESULT " + json.dumps({"seconds": best[0], "frames": best[1] / 1920, "first_audio": best[2],
                              "split": stats["backend"]["ms_per_frame"], "rss_mib": stats["memory"]["peak_rss"] / 2**20}))
"""

# tools/quantize.cpp's policy: every matrix and convolution kernel quantized, except the RVQ
# codebooks, the projections around them and the speaker encoder's last layer; a row that is not
# a whole number of 32-value blocks (the convolutions' kernels) goes to float16.
QWENTTS_CONVERT = """
import importlib.util, json, sys
from pathlib import Path
import numpy as np, gguf
convert_py, checkpoint, talker_out, codec_out, quant = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("qwentts_convert", convert_py)
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)
kind = getattr(gguf.GGMLQuantizationType, quant)
add_tensor = gguf.GGUFWriter.add_tensor
KEEP = ("tok_enc.vq_", "tok_dec.vq_", "spk_enc.fc.weight")
def quantized(self, name, array, *args, **kwargs):
    if array.ndim < 2 or any(part in name for part in KEEP):
        return add_tensor(self, name, array, *args, **kwargs)
    if array.shape[-1] % 32:
        return add_tensor(self, name, array.astype(np.float16))
    return add_tensor(self, name, gguf.quants.quantize(array.astype(np.float32), kind), raw_dtype=kind)
gguf.GGUFWriter.add_tensor = quantized
hidden = json.loads((Path(checkpoint) / "config.json").read_text())["talker_config"]["hidden_size"]
if convert.convert_talker_base(Path(checkpoint), Path(talker_out), "0.6B" if hidden <= 1024 else "1.7B"):
    sys.exit("talker conversion failed")
if convert.convert_tokenizer_12hz(Path(checkpoint) / "speech_tokenizer", Path(codec_out)):
    sys.exit("codec conversion failed")
"""

QWENTTS_RUN = """
import json, re, resource, sys, time
from qwentts_cpp_cpu import QwenTTS
talker, codec, frames, threads, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tts = QwenTTS(talker, codec, cpu_threads=threads)
log = []
tts.set_log_callback(lambda level, message: log.append(message))
list(tts.stream(text=text, speaker="ryan", max_new_tokens=4, seed=0))  # warm-up
best = None
for _ in range(2):
    log.clear()
    started, first, samples = time.perf_counter(), None, 0
    for chunk, _rate in tts.stream(text=text, speaker="ryan", max_new_tokens=frames, seed=0):
        first = first or time.perf_counter() - started
        samples += len(chunk)
    seconds = time.perf_counter() - started
    perf = {name: float(ms) for name, ms in re.findall(r"\\[Perf\\] (\\w+) ([0-9.]+) ms", "\\n".join(log))}
    produced = samples / 1920
    split = {"talker": perf["TalkerDecode"] / produced, "predictor": perf["CodePredictor"] / produced,
             "codec": perf["CodecDecode"] / produced}
    if best is None or seconds / produced < best[0] / best[1]:
        best = (seconds, produced, first, split)
print("RESULT " + json.dumps({"seconds": best[0], "frames": best[1], "first_audio": best[2], "split": best[3],
                              "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_script(python: str, script: str, *args: str) -> dict:
    return run_child([python, "-c", script, *args])


def ours(checkpoint: str, mode: str, frames: int) -> dict:
    # As shipped: the model thread on all cores but the one the codec decodes on (on every core
    # while the codec idles). Forcing every core on the model as well oversubscribes them: in
    # one run with it our int8 took 476 ms a frame in one round and 984 in the next.
    command = [sys.executable, str(HERE / "quantize_speed.py"), "--checkpoint", checkpoint, "--frames", str(frames),
               "--one", mode, "--repeats", "2"]
    row = run_child(command)
    return {"ms_per_frame": 1000 / row["fps"], "first_audio": row["first_audio"],
            "split": {k: (v or 0) * 1000 for k, v in row["split"].items()}, "rss_mib": row["rss_mib"]}


def vox_model(vox_python: str, checkpoint: str, quant: str) -> Path:
    out = Path(checkpoint).with_name(f"{Path(checkpoint).name}-vox-{quant}.tmod")
    if not out.exists():
        subprocess.run([vox_python, "-m", "vox", "build", "--model", checkpoint, "--quant", quant, "--no-hash", "-o", str(out)], check=True)
    return out


def vox(vox_python: str, tmod: Path, frames: int, threads: int) -> dict:
    row = run_script(vox_python, VOX_RUN, str(tmod), str(frames), str(threads), TEXT)
    return {"ms_per_frame": 1000 * row["seconds"] / row["frames"], "first_audio": row["first_audio"],
            "split": row["split"], "rss_mib": row["rss_mib"]}


def qwentts_model(python: str, convert_py: str, checkpoint: str, quant: str) -> tuple[Path, Path]:
    stem = Path(checkpoint).with_name(f"{Path(checkpoint).name}-qwentts-{quant}")
    talker, codec = Path(f"{stem}-talker.gguf"), Path(f"{stem}-codec.gguf")
    if not (talker.exists() and codec.exists()):
        partial = [Path(f"{path}.partial") for path in (talker, codec)]
        done = subprocess.run([python, "-c", QWENTTS_CONVERT, convert_py, checkpoint, *map(str, partial), quant], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"qwentts.cpp conversion failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        for path, final in zip(partial, (talker, codec)):
            os.replace(path, final)
    return talker, codec


def qwentts(python: str, files: tuple[Path, Path], frames: int, threads: int) -> dict:
    row = run_script(python, QWENTTS_RUN, *map(str, files), str(frames), str(threads), TEXT)
    return {"ms_per_frame": 1000 * row["seconds"] / row["frames"], "first_audio": row["first_audio"],
            "split": row["split"], "rss_mib": row["rss_mib"]}


def version_of(python: str, module: str) -> str:
    return subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--vox-python", help="python of a virtual environment with vox-tts installed")
    parser.add_argument("--qwentts-python", help="python of a virtual environment with realtimetts-qwen-native-cpu, gguf, safetensors, torch")
    parser.add_argument("--qwentts-convert", help="convert.py from the qwentts.cpp repository")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="the other engines' threads")
    parser.add_argument("--output", type=Path, default=HERE.parent / "BENCHMARKS.md")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    if bool(args.qwentts_python) != bool(args.qwentts_convert):
        parser.error("--qwentts-python and --qwentts-convert go together")

    engines: dict[int, list] = {8: [], 4: []}
    for bits, mode in ((8, "int8"), (4, "int4")):
        engines[bits].append((f"ours {mode}", lambda mode=mode: ours(args.checkpoint, mode, args.frames)))
    if args.vox_python:
        version = version_of(args.vox_python, "vox")
        for bits, quant in ((8, "q8"), (4, "q4")):
            tmod = vox_model(args.vox_python, args.checkpoint, quant)
            engines[bits].append((f"vox-tts {version} {quant}", lambda tmod=tmod: vox(args.vox_python, tmod, args.frames, args.threads)))
    if args.qwentts_python:
        version = version_of(args.qwentts_python, "qwentts_cpp_cpu")
        for bits, quant in ((8, "Q8_0"), (4, "Q4_0")):
            files = qwentts_model(args.qwentts_python, args.qwentts_convert, args.checkpoint, quant)
            engines[bits].append((f"qwentts.cpp {version} {quant}", lambda files=files: qwentts(args.qwentts_python, files, args.frames, args.threads)))

    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name, run in engines[8] + engines[4]:
            row = run()
            print(f"round {round_ + 1}: {name}: {row['ms_per_frame']:.0f} ms per frame", flush=True)
            if name not in best or row["ms_per_frame"] < best[name]["ms_per_frame"]:
                best[name] = row
    reference = best["ours int8"]["ms_per_frame"]
    lines = [
        f"- machine: {machine()}; checkpoint `{Path(args.checkpoint).name}`; {args.frames} frames of the same sentence, "
        f"best of {args.rounds} alternating rounds; vox and qwentts.cpp on {args.threads} threads, ours as shipped, through "
        "the Wyoming server (the model on all cores but the codec's, on every core while the codec idles); every process "
        "on the same allocator",
        "",
        "| engine | ms per frame | relative to ours int8 | first audio ms | talker ms | predictor ms | codec ms | RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in best.items():
        split = row["split"]
        lines.append(
            f"| {name} | {row['ms_per_frame']:.0f} | {row['ms_per_frame'] / reference:.2f} | {row['first_audio'] * 1000:.0f} | "
            f"{split.get('talker', 0):.0f} | {split.get('predictor', 0):.0f} | {split.get('codec', 0):.0f} | {row['rss_mib']:.0f} |"
        )
    lines += [
        "",
        "- ms per frame: the utterance's wall time / its frames, prefill included; first audio: from the request to the "
        "first chunk, the whole sentence given up front. The split is each engine's own: ours and qwentts.cpp's timers, "
        "vox's `stats()`; a codec that decodes on a thread of its own overlaps the next frames.",
        "- RSS: ours, what loading the model added to the process; vox and qwentts.cpp, the process's peak.",
    ]
    report = "\n".join(lines)
    print(report)
    write_report(args.output, args.label or f"ours against other engines on {Path(args.checkpoint).name}, CPU", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
