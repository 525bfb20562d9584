"""Streaming decode of codec frames to PCM, exact with respect to a one-shot decode.

The 12 Hz codec decoder is causal throughout: causal convolutions, transposed convolutions
that only trim on the right, and a transformer with a 72-frame sliding window. So it can run
chunk by chunk if each layer keeps what it needs from the previous chunk:

* a causal convolution keeps its last ``padding`` input samples and sees them instead of zeros;
* a transposed convolution keeps its last ``ceil(kernel / stride) - 1`` input samples and drops
  the outputs that belong to them;
* the transformer keeps its (sliding-window) KV cache.

This is done around the package's own convolution modules (a causal convolution's forward, a
transposed convolution's hooks), which do as the package does unless a stream is being decoded;
the decoder's top-level forward (ten lines) is followed here step by step, so that each
utterance's transformer runs over its own cache. Concatenated chunks equal the decode of all
frames at once (up to float rounding), so chunk boundaries cannot click.

Chunks of several utterances with the same number of frames decode together, as one batch: the
convolutions see every row's kept samples stacked (a row's first chunk gets zeros, exactly what
an unpadded first call computes), and a large model's widest weights are read once for all.
For short inputs PyTorch's CPU convolutions take slow paths; the widest of the codec's
convolutions run as plain matrix products instead, and a few more of the package's layers run
faster ways to the same numbers (`codec_kernels.py`).
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .codec_kernels import CodebookLookup, Snake, use_matmul_kernel
from .timings import StageTimings

if TYPE_CHECKING:
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Decoder


@dataclass
class DecoderState:
    """What the codec carries from one chunk of an utterance to the next."""

    tails: dict[int, torch.Tensor] = field(default_factory=dict)  # per module: inputs kept, [1, C, n]
    kv_cache: object | None = None
    frames: int = 0

    def snapshot(self) -> "DecoderState":
        """A copy to go back to if a decode fails half-way (tensors are replaced, never changed)."""
        cache = self.kv_cache
        if cache is not None:
            cache = copy.copy(cache)
            cache.layers = [copy.copy(layer) for layer in cache.layers]
        return DecoderState(dict(self.tails), cache, self.frames)


class StreamingCodecDecoder:
    """Decodes frames chunk by chunk for one codec. One owner thread at a time."""

    def __init__(self, decoder: "Qwen3TTSTokenizerV2Decoder") -> None:
        from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
            EuclideanCodebook,
            Qwen3TTSTokenizerV2CausalConvNet,
            Qwen3TTSTokenizerV2CausalTransConvNet,
            Qwen3TTSTokenizerV2ConvNeXtBlock,
            SnakeBeta,
        )

        self.decoder = decoder
        # Each decoding thread's own call: the rows it decodes, and per transposed convolution
        # the outputs to drop. Several threads may decode different streams at once.
        self._call = threading.local()
        self.timings = StageTimings()  # seconds spent decoding, for benchmarks and monitoring
        for module in decoder.modules():
            if isinstance(module, Qwen3TTSTokenizerV2CausalConvNet):
                if module.stride != 1:
                    raise ValueError("streaming decode supports stride-1 causal convolutions only")
                module.forward = functools.partial(self._causal_conv, module, module.forward)
                use_matmul_kernel(module.conv)
            elif isinstance(module, Qwen3TTSTokenizerV2CausalTransConvNet):
                module.register_forward_pre_hook(self._transconv_before)
                module.register_forward_hook(self._transconv_after)
                use_matmul_kernel(module.conv)
            elif isinstance(module, Qwen3TTSTokenizerV2ConvNeXtBlock):
                use_matmul_kernel(module.pwconv1)
                use_matmul_kernel(module.pwconv2)
            elif isinstance(module, EuclideanCodebook):
                module.decode = CodebookLookup(module)
            elif isinstance(module, SnakeBeta):
                module.forward = Snake(module)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def new_state(self) -> DecoderState:
        return DecoderState()

    def close(self) -> None:
        """Nothing to release: it decodes in this process (`CodecProcess` has a child to end)."""

    def decode(self, state: DecoderState, codes: torch.Tensor) -> torch.Tensor:
        """Waveform (float32, [frames * 1920]) for ``codes`` ([frames, 16]) continuing ``state``."""
        return self.decode_batch([state], [codes])[0]

    def decode_batch(self, states: Sequence[DecoderState], codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each row's waveform for its ``codes`` (all [frames, 16], the same frames) continuing its state.

        If decoding fails, every state is as it was before the call.
        """
        frames = codes[0].shape[0]
        if any(c.shape[0] != frames for c in codes):
            raise ValueError("a batch decodes chunks of one length")
        if frames == 0:
            return [torch.zeros(0) for _ in codes]
        started = time.perf_counter()
        saved = [state.snapshot() for state in states]
        self._call.rows, self._call.skips = list(states), {}
        try:
            with torch.inference_mode():
                batch = torch.stack([c.to(self.device).clamp(min=0).T for c in codes])
                wavs = self._forward(batch)
        except BaseException:
            for state, before in zip(states, saved):
                state.tails, state.kv_cache, state.frames = before.tails, before.kv_cache, before.frames
            raise
        finally:
            self._call.rows = None
        for state in states:
            state.frames += frames
        self.timings.add("codec", time.perf_counter() - started, frames * len(states))
        return [wav.reshape(-1).float() for wav in wavs]

    def _forward(self, codes: torch.Tensor) -> torch.Tensor:
        """`Qwen3TTSTokenizerV2Decoder.forward`, with each row's transformer over its own cache."""
        decoder = self.decoder
        hidden = decoder.quantizer.decode(codes)
        hidden = decoder.pre_conv(hidden).transpose(1, 2)
        hidden = torch.cat(
            [
                decoder.pre_transformer(
                    inputs_embeds=hidden[i : i + 1], past_key_values=self._cache_of(state), use_cache=True
                ).last_hidden_state
                for i, state in enumerate(self._rows)
            ]
        )
        hidden = hidden.permute(0, 2, 1)
        for blocks in decoder.upsample:
            for block in blocks:
                hidden = block(hidden)
        wav = hidden
        for block in decoder.decoder:
            wav = block(wav)
        return wav.clamp(min=-1, max=1)

    @property
    def _rows(self) -> list[DecoderState] | None:
        """The rows this thread is decoding (None outside a decode: the hooks then do nothing)."""
        return getattr(self._call, "rows", None)

    def _cache_of(self, state: DecoderState):
        if state.kv_cache is None:
            from transformers.cache_utils import DynamicCache

            state.kv_cache = DynamicCache(config=self.decoder.pre_transformer.config)
        return state.kv_cache

    def _stacked_tails(self, module, x: torch.Tensor, length: int) -> torch.Tensor | None:
        """The rows' kept inputs of ``module``, each left-filled with zeros to ``length``; None if none kept any."""
        kept = [state.tails.get(id(module)) for state in self._rows]
        if all(tail is None for tail in kept):
            return None
        rows = []
        for tail in kept:
            if tail is None:
                tail = x.new_zeros(1, x.shape[1], length)
            elif tail.shape[-1] < length:
                tail = torch.cat((x.new_zeros(1, x.shape[1], length - tail.shape[-1]), tail), dim=-1)
            rows.append(tail)
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def _keep(self, module, extended: torch.Tensor, length: int) -> None:
        tail = extended[..., max(0, extended.shape[-1] - length) :]
        for i, state in enumerate(self._rows):
            state.tails[id(module)] = tail[i : i + 1]

    # Causal convolution: the package's forward pads zeros on the left; a stream gets the previous
    # chunk's tail there instead (zeros at first), so no output is made only to be dropped.

    def _causal_conv(self, module, package_forward, x: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            return package_forward(x)
        if module.padding:
            tail = self._stacked_tails(module, x, module.padding)
            if tail is None:
                tail = x.new_zeros(x.shape[0], x.shape[1], module.padding)
            x = torch.cat((tail, x), dim=-1)
            self._keep(module, x, module.padding)
        return module.conv(x).contiguous()

    # Transposed convolution: prepend the inputs whose outputs overlap this chunk's.

    def _transconv_before(self, module, args):
        if self._rows is None:
            return None
        (x,) = args
        kernel, stride = module.conv.kernel_size[0], module.conv.stride[0]
        keep = math.ceil(kernel / stride) - 1
        # Zeros before a row's first chunk change none of its outputs: they add nothing where they
        # overlap, and their own outputs are dropped.
        previous = self._stacked_tails(module, x, keep) if keep else None
        extended = x if previous is None else torch.cat((previous, x), dim=-1)
        if keep:
            self._keep(module, extended, keep)
        self._call.skips[id(module)] = (0 if previous is None else keep) * stride
        return (extended,)

    def _transconv_after(self, module, args, output):
        if self._rows is None:
            return None
        return output[..., self._call.skips[id(module)] :]
