"""Codebooks 1-15 of a frame: the code predictor's 15 steps as one function.

The stock package calls Hugging Face `generate` for these 15 steps on every frame. Here they are
one plain function with static shapes (step i always sees i + 2 positions), so that on request it
can be handed to `torch.compile`: on CPU the inductor fuses each step's small operations, on CUDA
the "reduce-overhead" mode replays the whole loop as CUDA graphs. int8 weights enter the graph
as one operator per product (`quantized_linear.py`), so their kernel runs and everything around
it is fused; int4's kernel is a PyTorch operator already. Uncompiled on a GPU, the loop is recorded
as one CUDA graph per batch size (`cuda_graphs.py`) and replayed. Any compile or capture failure
falls back to running the same function eagerly, once, with a warning.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cuda_graphs import CudaGraphRecorder
from .kv_cache import StaticKVCache
from .layers import DecoderStack, signed_sin
from .quantized_linear import linear_of
from .sampling import ExponentialNoise, SamplingOptions, choose_with_noise, noise_width

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictorSampling:
    """How the code predictor picks codebooks 1-15 (the `subtalker_*` options)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float

    @classmethod
    def of(cls, options: SamplingOptions) -> "PredictorSampling":
        return cls(
            do_sample=options.subtalker_do_sample,
            temperature=options.subtalker_temperature,
            top_k=options.subtalker_top_k,
            top_p=options.subtalker_top_p,
        )


class CodePredictorLoop:
    """Runs the package's code predictor for a batch of frames at a time. One owner thread.

    All rows of a batch sit at the same position of their frame (the predictor starts afresh
    every frame), so the whole batch runs each step's layers together, with one attention call.
    """

    def __init__(
        self,
        predictor,
        code0_embedding: torch.nn.Embedding,
        groups: int,
        compile: bool = False,
        recorder: CudaGraphRecorder | None = None,
    ) -> None:
        """``recorder``: records the loop per batch size (`cuda_graphs.py`; used when not compiling)."""
        self.stack = DecoderStack.of(predictor.model, predictor.config)
        self.kv_heads = predictor.config.num_key_value_heads
        self.project = predictor.small_to_mtp_projection
        self.code0_table = code0_embedding.weight
        self.tables = tuple(embedding.weight for embedding in predictor.model.codec_embedding)
        self.heads = tuple(linear_of(head) for head in predictor.lm_head)
        self.steps = groups - 1
        self.vocab = predictor.lm_head[0].out_features
        self.device, self.dtype = self.code0_table.device, self.code0_table.dtype
        positions = torch.arange(groups, device=self.device).unsqueeze(0)
        # Positions restart at 0 every frame: one rotary table serves all frames.
        cos, sin = predictor.model.rotary_emb(torch.zeros(1, device=self.device, dtype=self.dtype), positions)
        self.cos, self.sin = cos.unsqueeze(1), signed_sin(sin.unsqueeze(1))
        self.compile = compile
        # One graph per (sampling, draws per choice): a seeded row draws for every code, others for the top-k.
        self._compiled: dict[tuple[PredictorSampling, int], object] = {}
        self.compiled_frames = 0  # frames whose codebooks 1-15 came from a compiled loop
        # Fixed input buffers per batch size: a compiled graph is specialised to its inputs'
        # strides and dispatch keys, and CUDA graphs read from fixed addresses.
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # Recorded replays of the loop by batch size, for the one sampling configuration warmed up
        # (the checkpoint's default, unseeded: what clients send); other requests run eagerly.
        self.recorder = None if compile else recorder
        self._recorded_key: tuple[PredictorSampling, int] | None = None
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        self.recorded_frames = 0  # frames whose codebooks 1-15 came from a recorded replay

    def _width(self, sampling: PredictorSampling, stock_stream: bool) -> int:
        """Random numbers per choice: `noise_width`, or the vocabulary when greedy (no draws)."""
        return noise_width(self.vocab, sampling.top_k, stock_stream) if sampling.do_sample else self.vocab

    def _buffers(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden [B, 1, D], code0 [B], noise [B, 15, width]) for a batch of ``rows``."""
        buffers = self._inputs.get((rows, width))
        if buffers is None:
            buffers = (
                torch.zeros((rows, 1, self.code0_table.shape[1]), dtype=self.dtype, device=self.device),
                torch.zeros(rows, dtype=torch.long, device=self.device),
                torch.ones((rows, self.steps, width), dtype=torch.float32, device=self.device),
            )
            if rows > 1:
                # One compiled graph serves every batch of two rows or more.
                for buffer in buffers:
                    torch._dynamo.maybe_mark_dynamic(buffer, 0)
            self._inputs[(rows, width)] = buffers
        return buffers

    def codes(
        self,
        last_hidden: torch.Tensor,
        code0: torch.Tensor,
        samplings: Sequence[PredictorSampling],
        noise: Sequence[ExponentialNoise | None],
    ) -> torch.Tensor:
        """Codebooks 1-15 [B, 15] of B frames whose talker outputs are ``last_hidden`` [B, 1, D].

        Row i samples with ``samplings[i]`` from ``noise[i]``: the same random numbers it would
        draw alone (one draw of 15 x its `noise_width` per frame).
        """
        rows = last_hidden.shape[0]
        sampling = samplings[0]
        if any(other != sampling for other in samplings[1:]):
            # Rows with different settings: one batched pass, each row chooses its own way.
            drawn = [
                source.fill(last_hidden.new_empty((self.steps, self._width(s, source.stock_stream)), dtype=torch.float32))
                if s.do_sample
                else None
                for s, source in zip(samplings, noise)
            ]
            return self._loop(last_hidden, code0, drawn, tuple(samplings))
        # One width for the batch: a seeded row among them makes every row draw for each code.
        width = max(self._width(sampling, source is not None and source.stock_stream) for source in noise)
        # Before the inputs are filled: a first recording for this batch size checks itself on them.
        replay = self._replay(sampling, width, rows) if (sampling, width) == self._recorded_key else None
        hidden_in, code0_in, noise_in = self._buffers(rows, width)
        drawn = None
        if sampling.do_sample:
            for row, source in zip(noise_in, noise):
                source.fill(row)
            drawn = noise_in
        if replay is not None:
            hidden_in.copy_(last_hidden)
            code0_in.copy_(code0)
            try:
                codes = replay().clone()  # the next replay overwrites its output
                self.recorded_frames += rows
                return codes
            except Exception as error:  # noqa: BLE001 - any replay failure means: run eagerly
                self._give_up_recording(error)
        compiled = self._compiled.get((sampling, width))
        if compiled is not None:
            hidden_in.copy_(last_hidden)
            code0_in.copy_(code0)
            try:
                # Should anything still differ from what was compiled, run eagerly rather than
                # stall every request behind a new compile.
                with torch.compiler.set_stance("eager_on_recompile"):
                    codes = self._run_compiled(compiled, hidden_in, code0_in, drawn)
                self.compiled_frames += rows
                return codes
            except Exception as error:  # noqa: BLE001 - any backend failure means: run eagerly
                self._give_up_compiling(error)
        return self._loop(last_hidden, code0, drawn, sampling)

    @staticmethod
    def _run_compiled(compiled, hidden: torch.Tensor, code0: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        # Compiled CUDA graphs reuse their output buffer on the next replay: copy it out.
        return compiled(hidden, code0, noise).clone()

    def warm_up(self, sampling: PredictorSampling, max_rows: int = 2) -> None:
        """Compile (or record) the loop for ``sampling`` now, before the first request, for
        batches of up to ``max_rows``.

        Only this sampling configuration (the checkpoint's default) runs compiled or recorded, and
        only for unseeded requests (what clients send; a seeded one draws the stock numbers, for
        every code); any other request runs eagerly rather than stall everyone behind a compile.
        Compiling makes one graph for single rows and one for batches (any size from two up);
        recording makes one per batch size, every size now, so that no step records later while
        the decode threads use the GPU (a batch larger than ``max_rows`` records at its first step).
        """
        width = self._width(sampling, stock_stream=False)
        key = (sampling, width)
        if self.recorder is not None:
            self._recorded_key = key
            started = time.monotonic()
            if all(self._replay(sampling, width, rows) is not None for rows in range(1, max_rows + 1)):
                _LOGGER.info(
                    "Code predictor recorded as CUDA graphs for batches of 1 to %d rows in %.1f s", max_rows, time.monotonic() - started
                )
            return
        if not self.compile or key in self._compiled:
            return
        batch_sizes = (1, 2) if max_rows > 1 else (1,)
        cuda = self.device.type == "cuda"
        try:
            self._compiled[key] = torch.compile(
                functools.partial(self._loop, sampling=sampling),
                fullgraph=True,
                # CUDA graphs on a GPU; on CPU a C++ wrapper, because calling the ~40 fused
                # kernels of each step from Python costs more than they do on a small model.
                mode="reduce-overhead" if cuda else None,
                options=None if cuda else {"cpp_wrapper": True},
            )
        except Exception as error:  # noqa: BLE001
            self._give_up_compiling(error)
            return
        started = time.monotonic()
        try:
            with torch.inference_mode():  # as in generation: the graph is specialised to it
                for rows in batch_sizes:
                    hidden, code0, noise = self._buffers(rows, width)
                    for _ in range(2):  # CUDA graph trees record on the second call
                        self._run_compiled(self._compiled[key], hidden, code0, noise if sampling.do_sample else None)
        except Exception as error:  # noqa: BLE001 - no C++ compiler, unsupported GPU, ...
            self._give_up_compiling(error)
            return
        _LOGGER.info("Code predictor compiled in %.1f s", time.monotonic() - started)

    def _replay(self, sampling: PredictorSampling, width: int, rows: int) -> Callable[[], torch.Tensor] | None:
        """The recorded loop for ``rows``, recorded now if it is the first batch of that size; None
        when recording is off or failed. A new recording must give the eager loop's very codes."""
        replay = self._replays.get(rows)
        if replay is not None or self.recorder is None:
            return replay
        hidden, code0, noise = self._buffers(rows, width)
        drawn = noise if sampling.do_sample else None
        try:
            with torch.inference_mode():  # as in generation
                replay = self.recorder.record(lambda: self._loop(hidden, code0, drawn, sampling))
                generator = torch.Generator().manual_seed(rows)
                hidden.copy_(torch.randn(hidden.shape, generator=generator))
                code0.copy_(torch.randint(self.vocab, code0.shape, generator=generator))
                noise.copy_(torch.empty(noise.shape).exponential_(generator=generator))
                expected = self._loop(hidden.clone(), code0.clone(), None if drawn is None else noise.clone(), sampling)
                if not torch.equal(replay(), expected):
                    raise RuntimeError(f"the replay for {rows} rows chose other codes than the loop run eagerly")
        except Exception as error:  # noqa: BLE001 - no CUDA graphs here, a kernel that cannot be recorded, ...
            self._give_up_recording(error)
            return None
        self._replays[rows] = replay
        return replay

    def _give_up_recording(self, error: Exception) -> None:
        _warn_running_eagerly("Recording the code predictor as CUDA graphs failed", error, "unrecorded", "--no-cuda-graphs skips the attempt")
        self.recorder = None
        self._recorded_key = None
        self._replays.clear()

    def _give_up_compiling(self, error: Exception) -> None:
        _warn_running_eagerly("torch.compile failed for the code predictor", error, "uncompiled", "leave out --compile to skip the attempt")
        self.compile = False
        self._compiled.clear()

    def _loop(
        self,
        last_hidden: torch.Tensor,
        code0: torch.Tensor,
        noise: torch.Tensor | list[torch.Tensor | None] | None,
        sampling: PredictorSampling | tuple[PredictorSampling, ...],
    ) -> torch.Tensor:
        """The 15 steps for B rows. ``sampling`` is one for all rows (with ``noise`` [B, 15, width]
        or None), or one per row (with ``noise`` a list of [15, width] or None)."""
        cache = self.new_cache(last_hidden.shape[0])
        embeds = torch.cat((last_hidden, F.embedding(code0, self.code0_table).unsqueeze(1)), dim=1)
        codes = []
        for step in range(self.steps):
            if step > 0:
                embeds = F.embedding(codes[-1], self.tables[step - 1]).unsqueeze(1)
            end = cache.length + embeds.shape[1]
            cos, sin = self.cos[:, :, cache.length : end], self.sin[:, :, cache.length : end]
            hidden = self.stack.forward(self.project(embeds), cos, sin, cache)
            logits = self.heads[step](hidden[:, -1]).float()
            codes.append(self._choose(logits, noise, step, sampling))
        return torch.stack(codes, dim=1)

    def new_cache(self, rows: int) -> StaticKVCache:
        """Keys and values of one frame's positions for ``rows``: the talker's output and codebook
        0's embedding, then one position per step.

        Made at once and written step by step: growing them by concatenation copied every
        position again at every step.
        """
        return StaticKVCache(
            len(self.stack.layers), self.kv_heads, self.stack.head_dim, self.steps + 1, self.dtype, self.device, rows=rows
        )

    @staticmethod
    def _choose(logits, noise, step: int, sampling) -> torch.Tensor:
        if isinstance(sampling, PredictorSampling):
            step_noise = None if noise is None else noise[:, step]
            return choose_with_noise(logits, step_noise, sampling.temperature, sampling.top_k, sampling.top_p)
        return torch.cat(
            [
                choose_with_noise(
                    logits[i : i + 1],
                    None if row_noise is None else row_noise[step : step + 1],
                    row.temperature,
                    row.top_k,
                    row.top_p,
                )
                for i, (row, row_noise) in enumerate(zip(sampling, noise))
            ]
        )


def _warn_running_eagerly(what: str, error: Exception, how: str, advice: str) -> None:
    _LOGGER.warning(
        "%s (%s: %s); running it %s from now on. Speech is the same, only slower; %s.",
        what,
        type(error).__name__,
        str(error).splitlines()[0] if str(error) else "",
        how,
        advice,
    )
