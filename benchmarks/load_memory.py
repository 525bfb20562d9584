"""The server's memory from start to its first reply, by weight format, as a user runs it.

    python benchmarks/load_memory.py --checkpoint CKPT [--settings none,int8,int4,bfloat16]
                                     [--clone-model BASE_CKPT] [--before CHECKOUT] [--rounds 1]

Starts `python -m wyoming_qwen3tts` on the checkpoint for each setting, in a process of its own,
and reads the process's memory from /proc every 20 ms: while it loads (until it answers
`describe`) and while it speaks one short sentence. Reports the process's own memory (RssAnon:
what it cannot give back without swap) and the pages it maps from the model's files (RssFile:
page cache, which the kernel drops under pressure and reads again), each at its peak and at the
end, and the peak of the two together (VmHWM, what `ps` and a naive RSS show). With ``--before``
``--clone-model`` the server loads a Base checkpoint too (as
for one-off clones over the HTTP API), so both models count. With ``--before``
every setting runs a second time with another checkout's code (its folder first on PYTHONPATH),
the two in turns. Writes a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import _free_port, machine
from report import publish
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

SETTINGS = {"none": ("float32", "none"), "int8": ("float32", "int8"), "int4": ("float32", "int4"), "bfloat16": ("bfloat16", "none")}
TEXT = "Good night."
FIELDS = ("RssAnon", "RssFile", "VmHWM")


@dataclass
class MemoryWatch:
    """Samples a process's memory (MiB) from /proc/PID/status; peaks per phase."""

    pid: int
    phase: str = "loading"
    peaks: dict[str, dict[str, float]] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def sample(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status", encoding="utf-8") as status:
                values = {k: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in status) if k in FIELDS}
        except (OSError, ValueError):
            return
        if len(values) < len(FIELDS):
            return
        self.last = values
        peaks = self.peaks.setdefault(self.phase, dict.fromkeys(FIELDS, 0.0))
        for key, value in values.items():
            peaks[key] = max(peaks[key], value)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample()
            time.sleep(0.02)


async def ready(port: int, deadline: float) -> str:
    """Wait until the server answers describe; its first voice."""
    while time.monotonic() < deadline:
        try:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Describe().event())
                while (event := await client.read_event()) is not None:
                    if Info.is_type(event.type):
                        return Info.from_event(event).tts[0].voices[0].name
        except OSError:
            await asyncio.sleep(0.2)
    raise TimeoutError("the server did not answer describe in time")


async def speak(port: int, voice: str) -> float:
    """Seconds of audio for one short sentence."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=voice)).event())
        samples = 0
        while (event := await client.read_event()) is not None:
            if event.type == "error":
                raise RuntimeError(f"synthesis failed: {event.data}")
            if event.type == "audio-chunk":
                samples += len(event.payload) // 2
            if event.type == "audio-stop":
                return samples / 24000
    raise RuntimeError("the server closed the connection")


def one_run(checkpoint: Path, setting: str, code: Path | None, data_dir: Path, clone_model: Path | None) -> dict:
    dtype, quantize = SETTINGS[setting]
    port = _free_port()
    environment = dict(os.environ)
    if code is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, (str(code), environment.get("PYTHONPATH"))))
    command = [sys.executable, "-m", "wyoming_qwen3tts", "--model", str(checkpoint), "--uri", f"tcp://127.0.0.1:{port}"]
    command += ["--dtype", dtype, "--quantize", quantize, "--data-dir", str(data_dir), "--log-level", "warning"]
    if clone_model is not None:
        command += ["--clone-model", str(clone_model), "--http-clones", "--http-port", str(_free_port())]
    started = time.monotonic()
    server = subprocess.Popen(command, env=environment, cwd=code or Path.cwd())
    watch, stop = MemoryWatch(server.pid), threading.Event()
    sampler = threading.Thread(target=watch.run, args=(stop,), daemon=True)
    sampler.start()
    try:
        voice = asyncio.run(ready(port, started + 600))
        loaded = time.monotonic() - started
        watch.sample()
        after_load = dict(watch.last)
        watch.phase = "speaking"
        audio = asyncio.run(speak(port, voice))
        watch.sample()
        after_reply = dict(watch.last)
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=60)
    return {"load_s": loaded, "audio_s": audio, "peaks": watch.peaks, "after_load": after_load, "after_reply": after_reply}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="CustomVoice checkpoint folder")
    parser.add_argument("--settings", default="none,int8,int4,bfloat16", help=f"any of {', '.join(SETTINGS)}")
    parser.add_argument("--clone-model", type=Path, help="a Base checkpoint the server loads too")
    parser.add_argument("--before", type=Path, help="another checkout: each setting also runs with its code, in turns")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/load-memory-data"))
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--label", default="memory from start to first reply")
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    versions = [("before", args.before.resolve()), ("after", None)] if args.before else [("this version", None)]
    rows = []
    for round_ in range(1, args.rounds + 1):
        for setting in settings:
            for version, code in versions:
                clone_model = args.clone_model.resolve() if args.clone_model else None
                result = one_run(args.checkpoint.resolve(), setting, code, args.data_dir, clone_model)
                loading, speaking = result["peaks"]["loading"], result["peaks"].get("speaking", {})
                row = (
                    f"| {setting} | {version} | {round_} | {result['load_s']:.1f} | {loading['RssAnon']:.0f} | {loading['VmHWM']:.0f} | "
                    f"{result['after_load']['RssAnon']:.0f} / {result['after_load']['RssFile']:.0f} | "
                    f"{speaking.get('RssAnon', 0):.0f} | {result['after_reply']['RssAnon']:.0f} / {result['after_reply']['RssFile']:.0f} |"
                )
                print(row, flush=True)
                rows.append(row)
    lines = [
        f"- machine: {machine()}; checkpoint `{args.checkpoint.name}`"
        + (f" and the clone model `{args.clone_model.name}`" if args.clone_model else "")
        + "; the server as users start it "
        f"(`python -m wyoming_qwen3tts --dtype … --quantize …`), one process per run; a reply: `synthesize` of \"{TEXT}\""
        + (f"; before: the code of `{args.before}`" if args.before else ""),
        "",
        "| setting | version | round | start until describe (s) | own memory at its peak while loading (MiB) | "
        "peak of own + file pages (MiB) | after loading: own / file pages (MiB) | own memory at its peak while speaking (MiB) | "
        "after the reply: own / file pages (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "- own memory: RssAnon, what the process holds that only swap could take back; file pages: RssFile, the model "
        "files' pages it maps, which the kernel drops under memory pressure and reads again when touched; the peak of "
        "the two together is VmHWM (what `ps` shows as RSS)",
    ]
    publish(Path(args.output), args.label, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
