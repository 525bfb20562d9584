"""Codebooks 1-15 of a frame: the code predictor's 15 steps as one function.

The stock package calls Hugging Face `generate` for these 15 steps on every frame. Here they are
one plain function with static shapes (step i always sees i + 2 positions), so that on request it
can be handed to `torch.compile`: on CPU the inductor fuses each step's small operations, on CUDA
the "reduce-overhead" mode replays the whole loop as CUDA graphs. Any compile or capture failure
falls back to running the same function eagerly, once, with a warning.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import DecoderStack, GrowingKVCache
from .quantize import QuantizedLinear, linear_of
from .sampling import SamplingOptions, choose_with_noise

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
    """Runs the package's code predictor for one frame at a time. One owner thread."""

    def __init__(self, predictor, code0_embedding: torch.nn.Embedding, groups: int, compile: bool = False) -> None:
        self.stack = DecoderStack.of(predictor.model, predictor.config)
        self.project = predictor.small_to_mtp_projection
        self.code0_table = code0_embedding.weight
        self.tables = tuple(embedding.weight for embedding in predictor.model.codec_embedding)
        self.heads = tuple(linear_of(head) for head in predictor.lm_head)
        self.steps = groups - 1
        self.vocab = predictor.lm_head[0].out_features
        device, dtype = self.code0_table.device, self.code0_table.dtype
        positions = torch.arange(groups, device=device).unsqueeze(0)
        # Positions restart at 0 every frame: one rotary table serves all frames.
        cos, sin = predictor.model.rotary_emb(torch.zeros(1, device=device, dtype=dtype), positions)
        self.cos, self.sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if compile and any(isinstance(m, QuantizedLinear) for m in predictor.modules()):
            # Dynamo cannot trace fbgemm's packed weights; the quantized kernels are fast as they are.
            _LOGGER.info("--compile does not apply to quantized weights: the code predictor runs their kernels directly")
            compile = False
        self.compile = compile
        self._compiled: dict[PredictorSampling, object] = {}
        self.compiled_frames = 0  # frames whose codebooks 1-15 came from a compiled loop
        # Fixed input buffers: a compiled graph is specialised to its inputs' strides and
        # dispatch keys, and CUDA graphs read from fixed addresses.
        self._hidden = torch.zeros((1, 1, self.code0_table.shape[1]), dtype=dtype, device=device)
        self._code0 = torch.zeros(1, dtype=torch.long, device=device)
        self._noise = torch.ones((self.steps, self.vocab), dtype=torch.float32, device=device)

    def codes(
        self,
        last_hidden: torch.Tensor,
        code0: torch.Tensor,
        sampling: PredictorSampling,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Codebooks 1-15 [15] for the frame whose talker output is ``last_hidden`` [1, 1, D]."""
        noise = self._noise.exponential_(generator=generator) if sampling.do_sample else None
        compiled = self._compiled.get(sampling)
        if compiled is not None:
            self._hidden.copy_(last_hidden)
            self._code0.copy_(code0)
            try:
                # Should anything still differ from what was compiled, run eagerly rather than
                # stall every request behind a new compile.
                with torch.compiler.set_stance("eager_on_recompile"):
                    codes = self._run_compiled(compiled, noise)
                self.compiled_frames += 1
                return codes
            except Exception as error:  # noqa: BLE001 - any backend failure means: run eagerly
                self._give_up_compiling(error)
        return self._loop(last_hidden, code0, noise, sampling)

    def _run_compiled(self, compiled, noise: torch.Tensor | None) -> torch.Tensor:
        # Compiled CUDA graphs reuse their output buffer on the next replay: copy it out.
        return compiled(self._hidden, self._code0, noise).clone()

    def warm_up(self, sampling: PredictorSampling) -> None:
        """Compile the loop for ``sampling`` now, before the first request.

        Only this sampling configuration (the checkpoint's default) runs compiled; a request with
        other settings runs eagerly rather than stall everyone behind a compile.
        """
        if not self.compile or sampling in self._compiled:
            return
        cuda = self.code0_table.device.type == "cuda"
        try:
            self._compiled[sampling] = torch.compile(
                functools.partial(self._loop, sampling=sampling),
                fullgraph=True,
                dynamic=False,
                # CUDA graphs on a GPU; on CPU a C++ wrapper, because calling the ~40 fused
                # kernels of each step from Python costs more than they do on a small model.
                mode="reduce-overhead" if cuda else None,
                options=None if cuda else {"cpp_wrapper": True},
            )
        except Exception as error:  # noqa: BLE001
            self._give_up_compiling(error)
            return
        noise = self._noise if sampling.do_sample else None
        started = time.monotonic()
        try:
            with torch.inference_mode():  # as in generation: the graph is specialised to it
                for _ in range(2):  # CUDA graph trees record on the second call
                    self._run_compiled(self._compiled[sampling], noise)
        except Exception as error:  # noqa: BLE001 - no C++ compiler, unsupported GPU, ...
            self._give_up_compiling(error)
            return
        _LOGGER.info("Code predictor compiled in %.1f s", time.monotonic() - started)

    def _give_up_compiling(self, error: Exception) -> None:
        _LOGGER.warning(
            "torch.compile failed for the code predictor (%s: %s); running it uncompiled from now on. "
            "Speech is the same, only slower; leave out --compile to skip the attempt.",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
        self.compile = False
        self._compiled.clear()

    def _loop(
        self, last_hidden: torch.Tensor, code0: torch.Tensor, noise: torch.Tensor | None, sampling: PredictorSampling
    ) -> torch.Tensor:
        cache = GrowingKVCache(len(self.stack.layers))
        embeds = torch.cat((last_hidden, F.embedding(code0, self.code0_table).unsqueeze(1)), dim=1)
        codes = []
        for step in range(self.steps):
            if step > 0:
                embeds = F.embedding(codes[-1], self.tables[step - 1]).unsqueeze(1)
            end = cache.length + embeds.shape[1]
            cos, sin = self.cos[:, :, cache.length : end], self.sin[:, :, cache.length : end]
            hidden = self.stack.forward(self.project(embeds), cos, sin, cache)
            logits = self.heads[step](hidden[:, -1]).float()
            step_noise = None if noise is None else noise[step : step + 1]
            codes.append(
                choose_with_noise(logits, step_noise, sampling.temperature, sampling.top_k, sampling.top_p)
            )
        return torch.cat(codes)
