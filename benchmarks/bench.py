"""Speed and memory of the streaming engine, side by side with the stock qwen-tts path.

    python benchmarks/bench.py --checkpoint CKPT [--frames 125] [--concurrency 1,2,4,8] [--compile]

CKPT is a checkpoint folder (a random-weight one from `python -m
wyoming_qwen3tts.dev.tiny_checkpoint OUT --size tiny|real-0.6b`). Random weights stop at random
or never, so the end-of-speech code is switched off for both paths and every utterance is
exactly --frames frames long (125 frames = 10 s of audio).

Measured in one run, on one machine:
* stock: `Qwen3TTSModel.generate_custom_voice` total time and frames per second;
* ours, through the Wyoming server over TCP: time from the `synthesize` event to the first
  PCM chunk, frames per second and real-time factor; at each concurrency the aggregate frames
  per second of all streams (they share batched steps) against one stream's, each stream's
  real-time factor and first audio (with `--unbatched`, the same again one row per step);
* the first audio of a request that arrives while three others stream, against an idle server,
  and how long it waited for the model thread's round in flight when it arrived (up to a step,
  by chance of timing: the ratio less that wait varies less between rounds);
* memory after loading (RSS, and CUDA memory on a GPU).
With `--codec-process off,on`, the concurrency rows and the newcomer run once with the codec on
threads of the server's process and once in a process of its own (`engine/codec_process.py`).
Prints a table and writes BENCHMARKS.md (or --output).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import platform
import resource
import signal
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import wyoming_qwen3tts  # noqa: F401 - first: it sets OpenMP's defaults before torch loads
import torch

from report import write_report
from wyoming_clients import FRAME_SECONDS, TEXT, BurstResult, concurrent_streams, in_own_process, newcomer_first_audio

from wyoming_qwen3tts.engine.allocator import memory_allocator
from wyoming_qwen3tts.engine.codec_process import CodecProcess
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.loader import parameter_bytes
from wyoming_qwen3tts.engine.options import BATCH_ATTENTION, CODEC_PRECISIONS, EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.request import SpeechRequests
from wyoming_qwen3tts.serve import build_catalog
from wyoming_qwen3tts.server.app import WyomingOptions, WyomingTtsServer
from wyoming_qwen3tts.settings import Settings


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WithoutEndOfSpeech(torch.nn.Module):
    """A codec head whose end-of-speech logit is pushed far down."""

    def __init__(self, head: torch.nn.Module, eos_id: int) -> None:
        super().__init__()
        self.head = head
        self.eos_id = eos_id

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).clone()
        logits[..., self.eos_id] -= 1e4
        return logits


def silence_end_of_speech(engine: SpeechEngine) -> None:
    """Random weights stop at random: make every utterance run to the frame cap."""
    for runtime in engine.runtimes.values():
        talker = runtime.wrapper.model.talker
        if not isinstance(talker.codec_head, WithoutEndOfSpeech):
            talker.codec_head = WithoutEndOfSpeech(talker.codec_head, runtime.wrapper.model.config.talker_config.codec_eos_token_id)


class ServerThread:
    """The Wyoming server on its own event loop, as Home Assistant would reach it."""

    def __init__(self, engine: SpeechEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        ready = threading.Event()

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            catalog = await build_catalog(engine, settings, [])
            server = WyomingTtsServer(settings.wyoming, SpeechRequests(engine, catalog, settings.requests))
            await server.start()
            ready.set()
            await self.stop_event.wait()
            await server.stop()

        self.thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self.thread.start()
        ready.wait(60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


class PrefillStarts:
    """When the engine creates a job and when its model thread starts preparing a request: how long a
    newcomer waited for the model thread's round in flight when it arrived (up to a whole step, by
    chance of timing)."""

    def __init__(self, engine: SpeechEngine) -> None:
        self._created: list[float] = []
        self._prepared: list[float] = []
        self._lock = threading.Lock()
        new_job, runtime = engine.worker.new_job, engine.runtimes["custom_voice"]
        prepare = runtime.prepare

        def recorded_new_job(*args, **kwargs):
            job = new_job(*args, **kwargs)
            with self._lock:
                self._created.append(time.perf_counter())
            return job

        def recorded_prepare(*args, **kwargs):
            with self._lock:
                self._prepared.append(time.perf_counter())
            return prepare(*args, **kwargs)

        engine.worker.new_job = recorded_new_job
        runtime.prepare = recorded_prepare

    def last_wait(self) -> float:
        """Seconds from the newest job's creation to the model thread's first prefill after it."""
        with self._lock:
            created = self._created[-1]
            return min(start for start in self._prepared if start >= created) - created


def streams_at_once(port: int, count: int, clients: str) -> BurstResult:
    """``count`` streams started together, from a process of their own or from this one's event loop."""
    if clients == "process":
        return in_own_process(port, "burst", count)
    return asyncio.run(concurrent_streams(port, count))


def newcomer(port: int, clients: str) -> float:
    """First audio of a request arriving once three others stream (see `newcomer_first_audio`)."""
    if clients == "process":
        return in_own_process(port, "newcomer")
    return asyncio.run(newcomer_first_audio(port))


def stock_run(engine: SpeechEngine, frames: int) -> tuple[float, float]:
    """Seconds and frames per second of the stock path for one utterance of ``frames`` frames."""
    wrapper = engine.runtimes["custom_voice"].wrapper
    if wrapper.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    wavs, _rate = wrapper.generate_custom_voice(TEXT, speaker="ryan", language="auto", max_new_tokens=frames + 1)
    if wrapper.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    produced = len(wavs[0]) / 1920
    return seconds, produced / seconds


def sentence_tokens(checkpoint: str) -> str:
    """How many text tokens the checkpoint's tokenizer makes of TEXT: an up-front prompt holds them all."""
    from transformers import AutoTokenizer

    from wyoming_qwen3tts.dev.text_tokenizer import QWEN_VOCAB_SIZE

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    count = len(tokenizer(TEXT)["input_ids"])
    if len(tokenizer) == QWEN_VOCAB_SIZE:
        return f"the sentence is {count} text tokens (Qwen's vocabulary, as the real model splits it)"
    return (f"the sentence is {count} text tokens (a small trained vocabulary of {len(tokenizer)}, which "
            "splits text finer than Qwen's: up-front prompts here are longer than real ones)")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # The same VM name has come with AVX2 and with AVX-512: PyTorch's kernels differ between them.
    text = f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, {memory:.0f} GiB RAM"
    text += f", {memory_allocator()} allocator"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="CustomVoice checkpoint folder")
    parser.add_argument("--base", help="Base checkpoint folder, to report the memory of both models")
    parser.add_argument("--frames", type=int, default=125, help="frames per utterance (125 = 10 s)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated stream counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true", help="run our engine with --compile")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, run the code predictor unrecorded (as --no-cuda-graphs)")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads for both paths (0 = all cores but one)")
    parser.add_argument(
        "--codec-threads", type=int, default=0, help="PyTorch CPU threads of each decoding thread (0 = the cores the model leaves)"
    )
    parser.add_argument("--quantize", default="none", help="weights of both paths (none, int8, int4; see quantize_speed.py for the comparison)")
    parser.add_argument("--codec-precision", default="auto", choices=CODEC_PRECISIONS, help="the codec decoder's number format (as --codec-precision)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement (the best is kept)")
    parser.add_argument("--max-batch", type=int, default=0, help="streams per batched step (0: the engine's default for the device)")
    parser.add_argument(
        "--batch-attention",
        choices=BATCH_ATTENTION,
        default="auto",
        help="how a batch attends to its talker histories: rows, padded, or auto (padded on a GPU, rows on a CPU)",
    )
    parser.add_argument("--unbatched", action="store_true", help="also measure each concurrency with one row per step")
    parser.add_argument(
        "--codec-process",
        default="off",
        help="where audio decodes: off (threads of the server's process, the default) or on (a process of its "
        "own); comma-separated to compare, e.g. off,on",
    )
    parser.add_argument(
        "--clients",
        choices=("process", "thread"),
        default="process",
        help="where the Wyoming clients run: a process of their own (default; Home Assistant is one) or this "
        "process's event loop, sharing the server's interpreter lock",
    )
    parser.add_argument("--no-stock", action="store_true", help="skip the stock path (and the cost-of-one-more-frame figures)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--label", default=None, help="name of this run in BENCHMARKS.md")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # script/device-check: where a step at its limit was

    load = LoadOptions(
        device=args.device, dtype=args.dtype, compile=args.compile, cuda_graphs=not args.no_cuda_graphs, threads=args.threads,
        quantize=args.quantize, codec_threads=args.codec_threads, codec_precision=args.codec_precision,
    )
    stop = StopRules(base_frames=args.frames, frames_per_token=0, max_frames=args.frames)
    codecs = [c.strip() for c in args.codec_process.split(",") if c.strip()]
    if not codecs or any(c not in ("off", "on") for c in codecs):
        parser.error(f"--codec-process takes off, on or both (off,on), not {args.codec_process!r}")
    stock = per_frame = memory = device = None
    rows, newcomers = [], {}
    compiled_share = recorded_share = 1.0
    padded = False
    for codec in codecs:
        rss_before = rss_mib()
        options = EngineOptions(
            model=args.checkpoint,
            load=load,
            stop=stop,
            max_batch=args.max_batch,
            codec_process=codec == "on",
            batch_attention=args.batch_attention,
        )
        engine = SpeechEngine.load(options)
        runtime = engine.runtimes["custom_voice"]
        where = "own process" if isinstance(runtime.decoder, CodecProcess) else "threads"
        if memory is None:
            device = runtime.wrapper.device
            memory = {"custom_voice_weights_mib": parameter_bytes(runtime.wrapper.model) / 2**20, "rss_custom_voice_mib": rss_mib() - rss_before}
            if device.type == "cuda":
                memory["cuda_custom_voice_mib"] = torch.cuda.memory_allocated() / 2**20
        if isinstance(runtime.decoder, CodecProcess):
            memory["rss_codec_process_mib"] = rss_mib(runtime.decoder.pid)
        silence_end_of_speech(engine)
        starts = PrefillStarts(engine)

        # Warm up both paths (first calls allocate and load kernels).
        if not args.no_stock and stock is None:
            stock_run(engine, 2)
        port = _free_port()
        settings = Settings(wyoming=WyomingOptions(uri=f"tcp://127.0.0.1:{port}"))
        server = ServerThread(engine, settings)
        streams_at_once(port, 1, args.clients)

        if not args.no_stock and stock is None:
            stock = min((stock_run(engine, args.frames) for _ in range(args.repeats)), key=lambda r: r[0])
            # Marginal cost of one more frame: the difference between a long and a short utterance.
            short = max(2, args.frames // 5)
            stock_short = min(stock_run(engine, short)[0] for _ in range(args.repeats))
            ours_long = min(streams_at_once(port, 1, args.clients).wall for _ in range(args.repeats))
            server.engine.options = replace(server.engine.options, stop=replace(stop, base_frames=short, max_frames=short))
            ours_short = min(streams_at_once(port, 1, args.clients).wall for _ in range(args.repeats))
            server.engine.options = replace(server.engine.options, stop=stop)
            per_frame = {
                "stock": (stock[0] - stock_short) / (args.frames - short),
                "ours": (ours_long - ours_short) / (args.frames - short),
            }
        batched = engine.worker.max_batch
        counts = [int(c) for c in args.concurrency.split(",") if c.strip()]
        for max_batch in ([batched, 1] if args.unbatched and batched > 1 else [batched]):
            engine.worker.max_batch = max_batch
            # Rounds of every concurrency in turn, not all repeats of one after another: this
            # machine's speed drifts, and a ratio of two numbers measured minutes apart drifts with it.
            rounds = []
            for _ in range(args.repeats):
                rounds.append({})
                for count in counts:
                    burst = rounds[-1][count] = streams_at_once(port, count, args.clients)
                    # Now, not only in the table at the end: a run stopped at a time limit still says what it got.
                    print(f"{count} streams (at most {max_batch} per step): {burst.aggregate_frames_per_second:.1f} frames/s", flush=True)
            for count in counts:
                burst = max((round_[count] for round_ in rounds), key=lambda b: b.aggregate_frames_per_second)
                rows.append((where, max_batch, count, burst, round_ratios(rounds, count)))
        engine.worker.max_batch = batched
        pairs = []
        for _ in range(args.repeats):
            idle = streams_at_once(port, 1, args.clients).streams[0].first_audio
            busy = newcomer(port, args.clients)
            pairs.append((idle, busy, starts.last_wait()))
        newcomers[where] = {
            "idle": min(idle for idle, _busy, _wait in pairs),
            "busy": min(busy for _idle, busy, _wait in pairs),
            # Each in round order: a round's ratio, its wait and its ratio less the wait line up.
            "rounds": [busy / idle for idle, busy, _wait in pairs],
            "waits": [wait for _idle, _busy, wait in pairs],
            "rounds_less_wait": [(busy - wait) / idle for idle, busy, wait in pairs],
        }
        # A compile that failed falls back to the uncompiled loop: say what actually ran.
        frames = runtime.frames
        compiled_share = min(compiled_share, frames.predictor.compiled_frames / max(1, frames.frames_generated))
        recorded_share = min(recorded_share, frames.predictor.recorded_frames / max(1, frames.frames_generated))
        padded = frames.slots is not None
        server.stop()
        engine.close()

    if args.base:
        rss_before = rss_mib()
        both = SpeechEngine.load(EngineOptions(model=args.checkpoint, clone_model=args.base, load=load, stop=stop))
        memory["base_weights_mib"] = parameter_bytes(both.runtimes["base"].wrapper.model) / 2**20
        memory["rss_custom_voice_plus_base_mib"] = rss_mib() - rss_before
        if device.type == "cuda":
            memory["cuda_both_models_mib"] = torch.cuda.memory_allocated() / 2**20
        both.close()
    memory["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        memory["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20

    report = render(args, device, stock, rows, newcomers, memory, per_frame, compiled_share, recorded_share, padded)
    print(report)
    write_report(Path(args.output), args.label or f"{Path(args.checkpoint).name} on {device.type}", report)
    return 0


def round_ratios(rounds: list[dict[int, BurstResult]], count: int) -> list[float]:
    """Aggregate frames per second of ``count`` streams over one stream's, in each round that ran both."""
    return sorted(
        r[count].aggregate_frames_per_second / r[1].aggregate_frames_per_second for r in rounds if 1 in r and count in r
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render(args, device, stock, rows, newcomers, memory, per_frame, compiled_share: float, recorded_share: float, padded: bool) -> str:
    if args.compile:
        predictor = f"compiled ({compiled_share:.0%} of our frames came from the compiled loop)"
    elif device.type == "cuda" and not args.no_cuda_graphs:
        predictor = f"uncompiled, recorded as CUDA graphs ({recorded_share:.0%} of our frames came from a replay)"
    else:
        predictor = "uncompiled"
    lines = [
        f"- machine: {machine()}",
        f"- torch {torch.__version__}, device {device}, dtype {args.dtype}, weights {args.quantize}, codec precision {args.codec_precision}, checkpoint "
        f"`{Path(args.checkpoint).name}`, our code predictor {predictor}, "
        f"{torch.get_num_threads()} threads, codec threads {args.codec_threads or 'auto (the cores the model leaves)'}, "
        f"batch attention {'padded' if padded else 'per row'}",
        f"- utterance: {args.frames} frames ({args.frames * FRAME_SECONDS:.1f} s of audio), end-of-speech code off, "
        f"the checkpoint's sampling settings; {sentence_tokens(args.checkpoint)}",
        "- Wyoming clients: " + (
            "in a process of their own, as Home Assistant is" if args.clients == "process"
            else "on the benchmark's event loop, in the server's process (they share its interpreter lock)"
        ),
        "",
        "| path | codec decodes on | rows per step | streams | first audio (s) | total (s) | aggregate frames/s | vs one stream | vs one stream, each round | real-time factor per stream |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if stock is not None:
        stock_seconds, stock_fps = stock
        lines.append(
            f"| stock generate_custom_voice | the model's thread | 1 | 1 | {stock_seconds:.3f} (all at the end) | {stock_seconds:.3f} | "
            f"{stock_fps:.1f} | | | {stock_fps * FRAME_SECONDS:.2f} |"
        )
    single = {}
    for where, max_batch, count, burst, ratios in rows:
        streams = burst.streams
        aggregate = burst.aggregate_frames_per_second
        single.setdefault((where, max_batch), aggregate if count == 1 else None)
        base = single[(where, max_batch)]
        first = statistics.median(r.first_audio for r in streams)
        rtf = statistics.median(r.frames_per_second for r in streams) * FRAME_SECONDS
        lines.append(
            f"| ours, Wyoming server | {where} | {max_batch} | {count} | {first:.3f} (median), {max(r.first_audio for r in streams):.3f} (max) | "
            f"{burst.wall:.3f} | {aggregate:.1f} | {f'{aggregate / base:.2f}x' if base else ''} | "
            f"{', '.join(f'{ratio:.2f}x' for ratio in ratios) if count != 1 else ''} | "
            f"{rtf:.2f} (min {min(r.frames_per_second for r in streams) * FRAME_SECONDS:.2f}) |"
        )
    lines.append("")
    for where, newcomer in newcomers.items():
        lines.append(
            f"- first audio of a request arriving while 3 others stream (codec on {where}): {newcomer['busy']:.3f} s, "
            f"idle server {newcomer['idle']:.3f} s (**{newcomer['busy'] / newcomer['idle']:.2f}x**; each round: "
            f"{', '.join(f'{ratio:.2f}x' for ratio in newcomer['rounds'])}); it waited "
            f"{', '.join(f'{wait * 1000:.0f}' for wait in newcomer['waits'])} ms for the model thread's round in flight when it arrived "
            f"(by chance, up to a step); less that wait, each round: "
            f"{', '.join(f'{ratio:.2f}x' for ratio in newcomer['rounds_less_wait'])}"
        )
    one = next((burst for _where, _mb, count, burst, _ratios in rows if count == 1), None)
    if stock is not None and one is not None:
        stream = one.streams[0]
        lines += [
            f"- ours vs stock, frames per second: **{stream.frames_per_second / stock[1]:.2f}x**",
            f"- our first audio / stock total time: **{stream.first_audio / stock[0]:.4f}**",
        ]
    if per_frame is not None:
        lines.append(
            f"- cost of one more frame: stock {per_frame['stock'] * 1000:.1f} ms, ours {per_frame['ours'] * 1000:.1f} ms "
            f"(ours / stock **{per_frame['ours'] / per_frame['stock']:.2f}**)"
        )
    lines.append("- memory: " + ", ".join(f"{k.replace('_mib', '')} {v:.0f} MiB" for k, v in memory.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
