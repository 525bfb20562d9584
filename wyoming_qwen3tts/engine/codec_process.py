"""The codec in a process of its own, so that decoding never waits for the model's interpreter lock.

Where both the model and the codec spend their time in Python between small kernels (a small
model on a CPU; any model on a GPU, where the work is launching kernels), a decode thread and the
model thread take turns at the interpreter lock, and each runs at about half its speed: on the
tiny checkpoint (2-core Intel Xeon VM) a 4-row model step took 57-60 ms next to a decoding thread
against 24-30 ms alone, while the codec decoded 372-443 frames a second against 671-723 alone.
With the codec in a second process the step took 27 ms and the codec decoded 592 frames a second.

`CodecProcess` stands in for a `StreamingCodecDecoder` in the model's process: the same
`new_state` / `decode` / `decode_batch`, where a state is only a handle and the decoder state it
names lives in the child. The child gets the codec's weights through shared memory (the same
pages, not a copy), builds the package's decoder module around them and serves one pipe per
calling thread (the decode threads, and the model thread for first chunks), each on a thread of
its own. A request that fails in the child fails alone, as in process. If the child dies, the
calls in flight fail with a message saying so, the next call starts a new child, and streams whose
decoder state died with the old one fail instead of playing audio that does not continue.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .timings import StageTimings

_LOGGER = logging.getLogger(__name__)

# Importing torch and the package and rebuilding the codec takes seconds; a child that has not
# answered by then is broken.
START_TIMEOUT_S = 300.0


class CodecProcessError(RuntimeError):
    """The codec process failed or ended; the message says what to do."""


@dataclass
class RemoteDecoderState:
    """A stream's decoder state, kept in the codec process; this is its name there."""

    id: int
    generation: int  # which child holds it (a restarted child holds none of the old ones)
    started: bool = False
    frames: int = 0


class CodecProcess:
    """A child process that decodes for one codec; any thread may call it."""

    def __init__(self, channels: int = 3, threads: int = 1) -> None:
        """Starts the child, which imports PyTorch and the package meanwhile (seconds): start it
        before loading the model, then `attach` the model's codec. ``channels``: how many threads
        may decode at the same time; ``threads``: PyTorch threads of a decode while others run
        (one that runs alone gets as many as its caller has: see `_CodecServer._cores`)."""
        self._channel_count = channels
        self._threads = threads
        self.timings = StageTimings()  # seconds spent decoding (in the child), for benchmarks and monitoring
        self._ids = itertools.count(1)
        self._released: deque[int] = deque()  # states whose handles are gone: the child may forget them
        self._lock = threading.Lock()
        self._module: torch.nn.Module | None = None
        self._generation = 0
        self._free: queue.Queue = queue.Queue()
        self._closed = False
        self._process, self._pipes = self._spawn()

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    @property
    def pid(self) -> int | None:
        """The child's process id (for monitoring its memory)."""
        return self._process.pid

    def _spawn(self):
        context = multiprocessing.get_context("spawn")
        pipes = [context.Pipe() for _ in range(self._channel_count)]
        process = context.Process(
            target=_child_main,
            args=([child for _parent, child in pipes], self._threads, logging.getLogger().level),
            name="qwen3tts-codec",
            daemon=True,
        )
        process.start()
        for _parent, child in pipes:
            child.close()
        return process, [parent for parent, _child in pipes]

    def attach(self, decoder: torch.nn.Module) -> "CodecProcess":
        """Hand the child the package's codec decoder module; its weights are shared, not copied."""
        with self._lock:
            self._module = decoder
            self._load()
        return self

    def _load(self) -> None:
        """Send the module to the spawned child and wait until it can decode (holding the lock)."""
        started = time.monotonic()
        process, first = self._process, self._pipes[0]
        tensors = dict(self._module.named_parameters())
        tensors.update(self._module.named_buffers())
        try:
            try:
                first.send(("load", type(self._module), self._module.config, {name: t.detach() for name, t in tensors.items()}))
            except RuntimeError as err:  # PyTorch could not put the weights in shared memory
                raise CodecProcessError(
                    f"the codec's weights ({sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20:.0f} MiB) "
                    f"could not be shared with the codec process ({err}). In Docker, give the container more shared "
                    "memory (--shm-size=1g), or leave --codec-process off"
                ) from err
            if not first.poll(START_TIMEOUT_S):
                raise CodecProcessError(f"the codec process did not start within {START_TIMEOUT_S:.0f} s")
            reply = first.recv()
        except (EOFError, OSError) as err:
            process.join(5)
            raise CodecProcessError(f"the codec process ended while starting (exit code {process.exitcode})") from err
        except BaseException:
            process.kill()
            raise
        if reply[0] != "ready":
            process.join(5)
            raise CodecProcessError(f"the codec process could not start: {reply[1]}")
        self._generation += 1
        self._free = queue.Queue()
        for pipe in self._pipes:
            self._free.put(pipe)
        _LOGGER.info("Codec process %d ready (%.1f s after the model)", process.pid, time.monotonic() - started)

    def new_state(self) -> RemoteDecoderState:
        state = RemoteDecoderState(next(self._ids), self._generation)
        # When the stream's state is dropped here, the child may forget it too (told with the next call).
        weakref.finalize(state, self._released.append, state.id)
        return state

    def decode(self, state: RemoteDecoderState, codes: torch.Tensor) -> torch.Tensor:
        """Waveform (float32, [frames * 1920]) for ``codes`` ([frames, 16]) continuing ``state``."""
        return self.decode_batch([state], [codes])[0]

    def decode_batch(self, states: Sequence[RemoteDecoderState], codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each row's waveform for its ``codes`` (all of one length) continuing its state, in one call."""
        frames = codes[0].shape[0]
        if any(c.shape[0] != frames for c in codes):
            raise ValueError("a batch decodes chunks of one length")
        channel, generation, free = self._channel()
        if any(state.started and state.generation != generation for state in states):
            free.put(channel)
            raise CodecProcessError("the codec process was restarted and this stream's audio cannot continue; try again")
        for state in states:
            # A stream that has decoded nothing holds nothing in any child: it belongs to this one (a
            # request that started before a dead child was noticed, which happens at this call).
            state.generation = generation
        released = []
        try:
            while True:  # other threads drain it too
                released.append(self._released.popleft())
        except IndexError:
            pass
        rows = [(s.id, not s.started) for s in states]
        request = ("decode", rows, [c.detach().cpu().numpy() for c in codes], released, torch.get_num_threads())
        try:
            channel.send(request)
            reply = channel.recv()
        except (EOFError, OSError) as err:
            self._lost(generation)
            free.put(channel)  # broken: whoever takes it next learns the same and fails the same way
            raise CodecProcessError(
                f"the codec process ended (exit code {self._process.exitcode}) while decoding; it will be started again "
                "for the next request. If this repeats, the log above says why (often: out of memory)"
            ) from err
        free.put(channel)
        if reply[0] != "audio":
            _kind, error_type, message = reply
            raise CodecProcessError(f"decoding failed in the codec process: {error_type}: {message}")
        _kind, waves, seconds = reply
        for state in states:
            state.started = True
            state.frames += frames
        self.timings.add("codec", seconds, frames * len(states))
        return [torch.from_numpy(wave) for wave in waves]

    def _channel(self) -> tuple[object, int, queue.Queue]:
        """A free pipe to the child, the child's generation and the pool the pipe goes back to;
        starts a new child if the last one died."""
        with self._lock:
            if self._closed:
                raise CodecProcessError("the codec process is shut down")
            if self._module is None:
                raise CodecProcessError("no codec attached to the codec process")
            if not self._process.is_alive():
                _LOGGER.warning("The codec process ended (exit code %s); starting it again", self._process.exitcode)
                self._process, self._pipes = self._spawn()
                self._load()
            generation, free = self._generation, self._free
        return free.get(), generation, free

    def _lost(self, generation: int) -> None:
        """A pipe broke: make sure the child is gone, so that the next call starts another."""
        with self._lock:
            if self._generation == generation:
                self._process.join(1)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join(5)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for pipe in self._pipes:  # a serving thread in the middle of a decode stops after it
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


# The child.


def _child_main(connections, threads: int, log_level: int) -> None:
    logging.basicConfig(level=log_level or logging.WARNING, format="%(levelname)s:%(name)s (codec process):%(message)s")
    torch.set_num_threads(threads)
    from .qwen_import import import_qwen_tts

    import_qwen_tts()  # the decoder's class comes with the first message
    first = connections[0]
    try:
        _kind, module_class, config, tensors = first.recv()
        decoder = _rebuild(module_class, config, tensors)
        from .decode import StreamingCodecDecoder

        server = _CodecServer(StreamingCodecDecoder(decoder), threads)
    except Exception as err:  # noqa: BLE001 - the parent raises it with the message
        _LOGGER.exception("The codec process could not start")
        first.send(("failed", f"{type(err).__name__}: {err}"))
        return
    first.send(("ready",))
    workers = [threading.Thread(target=server.serve, args=(c,), name=f"codec-{i}", daemon=True) for i, c in enumerate(connections)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _rebuild(module_class, config, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The decoder module around the parent's own tensors: built without weights, then given them."""
    with torch.device("meta"):
        module = module_class(config)
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    missing = [name for name, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if missing:
        raise ValueError(f"the codec's tensors did not all arrive (missing: {', '.join(missing[:5])})")
    return module.eval()


class _CodecServer:
    """The child's side: the streams' decoder states, and one serving thread per pipe."""

    def __init__(self, decoder, threads: int) -> None:
        self.decoder = decoder
        self.states: dict[int, object] = {}
        self._threads = threads
        self._active = 0
        self._lock = threading.Lock()

    def serve(self, connection) -> None:
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if message[0] == "stop":
                return
            try:
                reply = self.decode(*message[1:])
            except Exception as err:  # noqa: BLE001 - this request fails, the child goes on
                _LOGGER.exception("Decoding failed")
                reply = ("failed", type(err).__name__, str(err))
            try:
                connection.send(reply)
            except (EOFError, OSError):
                return

    def decode(self, rows: list[tuple[int, bool]], codes: list[np.ndarray], released: list[int], caller_threads: int):
        for state_id in released:
            self.states.pop(state_id, None)
        states = []
        for state_id, new in rows:
            if new:
                self.states[state_id] = self.decoder.new_state()
            state = self.states.get(state_id)
            if state is None:
                return ("failed", "LookupError", "this stream's decoder state is gone")
            states.append(state)
        started = time.perf_counter()
        with self._cores(caller_threads):
            waves = self.decoder.decode_batch(states, [torch.from_numpy(c) for c in codes])
        return ("audio", [wave.cpu().numpy() for wave in waves], time.perf_counter() - started)

    @contextmanager
    def _cores(self, caller_threads: int) -> Iterator[None]:
        """A decode that runs alone gets its caller's thread count, as it would decoding in the
        caller's process: the model thread decoding a first chunk in a round that started while
        the codec idled has every core, and it waits meanwhile. Others get the usual threads."""
        with self._lock:
            self._active += 1
            if self._active == 1 and caller_threads != self._threads:
                torch.set_num_threads(caller_threads)
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    torch.set_num_threads(self._threads)
