"""Soak: hours of mixed use in minutes, against a real server process, on loopback only.

    python benchmarks/soak.py [--minutes 20] [--remote] [--kill-every 180]

Starts the server (`python -m wyoming_qwen3tts`, tiny random checkpoint, Wyoming and HTTP) and
drives a bounded mix at it: Wyoming synthesize and streaming synthesis, HTTP speech (streamed
wav, mp3), clients that vanish mid-stream, malformed events, unknown voices, and 8-way bursts.
Every 30 s the load pauses and the server's RSS, threads, open file descriptors and asyncio
tasks are read. With `--remote` the mix goes through a remote front (`--engine remote`) whose
backend process is killed and restarted on a schedule; every request that was running at a
kill must end (audio or a clean error) within 10 s, and the first request after the backend is
back must succeed.

Prints a table and writes a section of BENCHMARKS.md. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from report import write_report
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import async_read_event
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_qwen3tts.engine.allocator import memory_allocator

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello there.", "The kitchen lights are on.", "It is twenty one degrees inside. Shall I close the windows?"]
# A request that gets nothing for STALL seconds hangs; one that is still running after OP_TIMEOUT
# (slow, but moving: many streams share one model on 2 cores) is cut off as a hang too.
STALL = 30.0
OP_TIMEOUT = 300.0
MAX_OPS = 100_000  # bound on the whole run, whatever the duration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A server process of ours, on loopback."""

    args: list[str]
    name: str
    wyoming_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    def start(self, log: Path) -> None:
        command = [sys.executable, "-m", "wyoming_qwen3tts", "--uri", f"tcp://127.0.0.1:{self.wyoming_port}",
                   "--http-port", str(self.http_port), *self.args]
        self.process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT)

    async def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
                try:
                    async with session.get(f"http://127.0.0.1:{self.http_port}/health") as response:
                        if response.status == 200 and (await response.json()).get("voices"):
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} did not get ready in {timeout:.0f} s")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def sample(self, tasks: int | None) -> dict:
        pid = self.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "tasks": tasks,
            "allocator": memory_allocator(Path(f"/proc/{pid}/maps")),
        }


class Stalled(Exception):
    """The server sent nothing for STALL seconds."""


@dataclass
class Outcome:
    kind: str
    result: str  # "ok", "expected-error", "unexpected-error", "hang"
    started: float
    ended: float
    detail: str = ""


class Mix:
    """The client side: one operation of each kind, each bounded by OP_TIMEOUT."""

    def __init__(self, wyoming_port: int, http_port: int) -> None:
        self.wyoming_port = wyoming_port
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.texts = itertools.cycle(TEXTS)

    def client(self) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.wyoming_port)

    async def _until(self, client: AsyncTcpClient, last: str) -> list:
        events = []
        while True:
            try:
                event = await asyncio.wait_for(client.read_event(), STALL)
            except asyncio.TimeoutError:
                raise Stalled(f"nothing for {STALL:.0f} s after {[e.type for e in events][-2:]}") from None
            if event is None:
                return events
            events.append(event)
            if event.type in (last, "error"):
                return events

    @staticmethod
    def _judge(events: list, last: str) -> tuple[str, str]:
        types = [e.type for e in events]
        if types and types[-1] == last and "audio-chunk" in types:
            return "ok", ""
        if types and types[-1] == "error":
            return "expected-error", events[-1].data.get("text", "")[:80]
        return "unexpected-error", " ".join(types[-3:]) or "connection closed"

    async def synthesize(self) -> tuple[str, str]:
        async with self.client() as client:
            await client.write_event(Synthesize(text=next(self.texts), voice=SynthesizeVoice(name="Ryan")).event())
            return self._judge(await self._until(client, "audio-stop"), "audio-stop")

    async def stream(self) -> tuple[str, str]:
        async with self.client() as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="Vivian")).event())
            for word in next(self.texts).split():
                await client.write_event(SynthesizeChunk(text=word + " ").event())
            await client.write_event(SynthesizeStop().event())
            return self._judge(await self._until(client, "synthesize-stopped"), "synthesize-stopped")

    async def vanish(self) -> tuple[str, str]:
        async with self.client() as client:
            await client.write_event(Synthesize(text=TEXTS[2], voice=SynthesizeVoice(name="Aiden")).event())
            event = await client.read_event()  # audio-start, then leave mid-stream
        return ("ok", "") if event is not None else ("unexpected-error", "closed before audio-start")

    async def unknown_voice(self) -> tuple[str, str]:
        async with self.client() as client:
            await client.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")).event())
            events = await self._until(client, "audio-stop")
        if [e.type for e in events] == ["error"] and "nobody" in events[0].data.get("text", ""):
            return "ok", ""
        return "unexpected-error", str([e.type for e in events])

    async def malformed(self) -> tuple[str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.wyoming_port)
        try:
            writer.write(b'{"type": "synthesize", "data_length": "many"}\n' + b"\x00" * 64)
            await writer.drain()
            # An error event, then the server drops us.
            event = await asyncio.wait_for(async_read_event(reader), timeout=10)
            rest = await asyncio.wait_for(reader.read(), timeout=10)
        except ValueError as error:  # what came back is not an event
            return "unexpected-error", f"not an event: {error}"
        finally:
            writer.close()
        if event is None or not Error.is_type(event.type):
            return "unexpected-error", f"got {event.type if event else 'a close'}"
        if Error.from_event(event).code != "malformed-event" or rest:
            return "unexpected-error", f"error {Error.from_event(event).code!r}, then {len(rest)} bytes"
        return "ok", ""

    async def http(self, response_format: str) -> tuple[str, str]:
        body = {"model": "qwen3-tts", "voice": "serena", "input": next(self.texts), "response_format": response_format}
        if response_format == "wav":
            body["stream_format"] = "audio"
        async with aiohttp.ClientSession() as session:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=STALL)
            async with session.post(f"{self.http_url}/v1/audio/speech", json=body, timeout=timeout) as response:
                data = await response.read()
                if response.status == 200 and len(data) > 1000:
                    return "ok", ""
                if response.status in (400, 500, 503) and b'"error"' in data:
                    return "expected-error", data[:80].decode(errors="replace")
                return "unexpected-error", f"HTTP {response.status}, {len(data)} bytes"

    async def tasks(self) -> int | None:
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{self.http_url}/health", timeout=aiohttp.ClientTimeout(total=10)) as response:
                    return (await response.json()).get("asyncio_tasks")
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None


OPERATIONS = ("synthesize", "stream", "http-wav", "http-mp3", "vanish", "unknown-voice", "malformed")


async def run_op(mix: Mix, kind: str) -> Outcome:
    started = time.monotonic()
    call = {
        "synthesize": mix.synthesize,
        "stream": mix.stream,
        "http-wav": lambda: mix.http("wav"),
        "http-mp3": lambda: mix.http("mp3"),
        "vanish": mix.vanish,
        "unknown-voice": mix.unknown_voice,
        "malformed": mix.malformed,
    }[kind]
    try:
        result, detail = await asyncio.wait_for(call(), OP_TIMEOUT)
    except asyncio.TimeoutError:
        result, detail = "hang", f"timed out (no end after {OP_TIMEOUT:.0f} s, or {STALL:.0f} s without data)"
    except Stalled as err:
        result, detail = "hang", str(err)
    except (OSError, aiohttp.ClientError) as err:
        result, detail = "expected-error", f"{type(err).__name__}: {err}"[:80]
    return Outcome(kind, result, started, time.monotonic(), detail)


@dataclass
class Kill:
    at: float
    back: float | None = None


async def soak(args: argparse.Namespace, workdir: Path) -> tuple[list[Outcome], list[dict], list[Kill]]:
    checkpoint = workdir / "tiny"
    if not checkpoint.exists():
        subprocess.run([sys.executable, "-m", "wyoming_qwen3tts.dev.tiny_checkpoint", str(checkpoint), "--kind", "custom_voice"], check=True, cwd=ROOT)
    log = workdir / "servers.log"
    local = ["--model", str(checkpoint), "--data-dir", str(workdir / "data")]
    backend = Server(local, "server" if not args.remote else "backend")
    backend.start(log)
    await backend.wait_ready()
    target = backend
    if args.remote:
        target = Server(["--engine", "remote", "--remote-url", f"http://127.0.0.1:{backend.http_port}/v1"], "front")
        target.start(log)
        await target.wait_ready()
    mix = Mix(target.wyoming_port, target.http_port)
    outcomes: list[Outcome] = []
    samples: list[dict] = []
    kills: list[Kill] = []
    started = time.monotonic()
    end = started + args.minutes * 60
    next_sample = started
    next_kill = started + args.kill_every if args.remote else float("inf")
    kinds = itertools.cycle(OPERATIONS)
    try:
        for cycle in range(MAX_OPS):
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_sample:
                await asyncio.sleep(1.0)  # between bursts: let the server settle
                sample = target.sample(await mix.tasks())
                sample["minute"] = (now - started) / 60
                samples.append(sample)
                next_sample += args.sample_every
            if now >= next_kill:  # kill the backend under two running requests
                pending = [asyncio.create_task(run_op(mix, kind)) for kind in ("synthesize", "http-wav")]
                await asyncio.sleep(0.3)
                kills.append(Kill(at=time.monotonic()))
                backend.kill()
                await asyncio.sleep(args.down_seconds)
                backend.start(log)
                await backend.wait_ready()
                kills[-1].back = time.monotonic()
                outcomes += await asyncio.gather(*pending)
                next_kill += args.kill_every
            if cycle % 10 == 9:  # an 8-way burst
                outcomes += await asyncio.gather(*(run_op(mix, "synthesize") for _ in range(8)))
            else:  # two at a time, from the mix
                outcomes += await asyncio.gather(run_op(mix, next(kinds)), run_op(mix, next(kinds)))
    finally:
        target.stop()
        if target is not backend:
            backend.stop()
    return outcomes, samples, kills


def judge(outcomes: list[Outcome], samples: list[dict], kills: list[Kill], remote: bool) -> list[str]:
    """What went wrong, as lines (none: every target met)."""
    problems = []
    kill_windows = [(k.at, (k.back or k.at) + 10.0) for k in kills]

    def near_kill(o: Outcome) -> bool:
        return any(o.started <= back and o.ended >= at for at, back in kill_windows)

    for o in outcomes:
        if o.result == "hang":
            problems.append(f"hang: {o.kind} {o.detail}")
        elif o.result == "unexpected-error":
            problems.append(f"unexpected error: {o.kind}: {o.detail}")
        elif o.result == "expected-error" and not near_kill(o) and o.kind != "malformed":
            problems.append(f"error outside a kill window: {o.kind}: {o.detail}")
    for kill in kills:
        running = [o for o in outcomes if o.started <= kill.at <= o.ended]
        late = [o for o in running if o.ended - kill.at > 10]
        if late:
            problems.append(f"{len(late)} requests running at a kill ended over 10 s after it")
        after = sorted((o for o in outcomes if kill.back and o.started >= kill.back and o.kind == "synthesize"), key=lambda o: o.started)
        if after and after[0].result != "ok":
            problems.append(f"first request after the backend returned failed: {after[0].detail}")
    settled = [s for s in samples if s["minute"] >= 2]
    if len(settled) >= 2:
        growth = settled[-1]["rss_mib"] / settled[0]["rss_mib"] - 1
        if growth >= 0.10:
            problems.append(f"RSS grew {growth:.1%} after minute 2")
        # Idle counts once warm (thread pools fill lazily): every later pause must come back to them.
        idle_threads, idle_fds = settled[0]["threads"], settled[0]["fds"]
        if max(s["threads"] for s in settled) > idle_threads + 2 or max(s["fds"] for s in settled) > idle_fds + 8:
            problems.append(f"threads/fds did not return to idle ({idle_threads}/{idle_fds})")
    return problems


def report(args, outcomes: list[Outcome], samples: list[dict], kills: list[Kill], problems: list[str]) -> str:
    counts = Counter((o.kind, o.result) for o in outcomes)
    lines = [
        f"- {args.minutes:g} minutes, {len(outcomes)} requests on loopback, tiny checkpoint"
        + (f", backend killed every {args.kill_every:.0f} s ({len(kills)} kills, down {args.down_seconds:.0f} s each)" if args.remote else ""),
        f"- machine: {os.cpu_count()} CPUs; server: `python -m wyoming_qwen3tts` (Wyoming + HTTP)" + (" behind a remote front" if args.remote else "")
        + (f", {samples[0]['allocator']} allocator" if samples else ""),
        "",
        "| request | ok | clean error | unexpected | hang |",
        "|---|---|---|---|---|",
    ]
    for kind in OPERATIONS:
        row = [counts[(kind, r)] for r in ("ok", "expected-error", "unexpected-error", "hang")]
        lines.append(f"| {kind} | " + " | ".join(str(n) for n in row) + " |")
    lines += ["", "| minute | RSS MiB | threads | fds | asyncio tasks |", "|---|---|---|---|---|"]
    for s in samples:
        lines.append(f"| {s['minute']:.1f} | {s['rss_mib']:.0f} | {s['threads']} | {s['fds']} | {s['tasks'] if s['tasks'] is not None else '-'} |")
    if kills:
        recoveries = [k.back - k.at for k in kills if k.back]
        lines += ["", f"- backend back (kill to ready, incl. {args.down_seconds:.0f} s down): " + ", ".join(f"{r:.1f} s" for r in recoveries)]
    lines += ["", "- verdict: " + ("every target met" if not problems else "; ".join(problems[:10]))]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--remote", action="store_true", help="through a remote front, killing the backend on a schedule")
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds between backend kills (--remote)")
    parser.add_argument("--down-seconds", type=float, default=5.0, help="how long a killed backend stays down")
    parser.add_argument("--sample-every", type=float, default=30.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    outcomes, samples, kills = asyncio.run(soak(args, workdir))
    problems = judge(outcomes, samples, kills, args.remote)
    text = report(args, outcomes, samples, kills, problems)
    print(text)
    label = "soak, remote front, backend killed on a schedule" if args.remote else "soak, one server"
    write_report(args.output, label, text)
    (workdir / "outcomes.json").write_text(json.dumps([o.__dict__ for o in outcomes if o.result != "ok"], indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
