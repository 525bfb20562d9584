"""Streaming decode of codec frames to PCM, exact with respect to a one-shot decode.

The 12 Hz codec decoder is causal throughout: causal convolutions, transposed convolutions
that only trim on the right, and a transformer with a 72-frame sliding window. So it can run
chunk by chunk if each layer keeps what it needs from the previous chunk:

* a causal convolution keeps its last ``padding`` input samples and sees them instead of zeros;
* a transposed convolution keeps its last ``ceil(kernel / stride) - 1`` input samples and drops
  the outputs that belong to them;
* the transformer keeps its (sliding-window) KV cache.

This is done with hooks around the package's own modules, so the package's forward code runs
unchanged; the hooks do nothing unless a stream is being decoded. Concatenated chunks equal the
decode of all frames at once (up to float rounding), so chunk boundaries cannot click.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .timings import StageTimings

if TYPE_CHECKING:
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Decoder


@dataclass
class DecoderState:
    """What the codec carries from one chunk of an utterance to the next."""

    tails: dict[int, torch.Tensor] = field(default_factory=dict)  # per module: inputs kept
    skips: dict[int, int] = field(default_factory=dict)  # per module: outputs to drop this call
    kv_cache: object | None = None
    frames: int = 0


class StreamingCodecDecoder:
    """Decodes frames chunk by chunk for one codec. One owner thread at a time."""

    def __init__(self, decoder: "Qwen3TTSTokenizerV2Decoder") -> None:
        from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
            Qwen3TTSTokenizerV2CausalConvNet,
            Qwen3TTSTokenizerV2CausalTransConvNet,
        )

        self.decoder = decoder
        self._active: DecoderState | None = None
        self.timings = StageTimings()  # seconds spent decoding, for benchmarks and monitoring
        for module in decoder.modules():
            if isinstance(module, Qwen3TTSTokenizerV2CausalConvNet):
                if module.stride != 1:
                    raise ValueError("streaming decode supports stride-1 causal convolutions only")
                module.register_forward_pre_hook(self._conv_before)
                module.register_forward_hook(self._conv_after)
            elif isinstance(module, Qwen3TTSTokenizerV2CausalTransConvNet):
                module.register_forward_pre_hook(self._transconv_before)
                module.register_forward_hook(self._transconv_after)
        decoder.pre_transformer.register_forward_pre_hook(self._attach_cache, with_kwargs=True)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def new_state(self) -> DecoderState:
        return DecoderState()

    def decode(self, state: DecoderState, codes: torch.Tensor) -> torch.Tensor:
        """Waveform (float32, [frames * 1920]) for ``codes`` ([frames, 16]) continuing ``state``."""
        if codes.shape[0] == 0:
            return torch.zeros(0)
        started = time.perf_counter()
        self._active = state
        try:
            with torch.inference_mode():
                wav = self.decoder(codes.to(self.device).clamp(min=0).T.unsqueeze(0))
        finally:
            self._active = None
        state.frames += codes.shape[0]
        wav = wav.reshape(-1).float()
        self.timings.add("codec", time.perf_counter() - started, codes.shape[0])
        return wav

    # Causal convolution: prepend the previous chunk's tail, drop the outputs made for it.

    def _conv_before(self, module, args):
        state = self._active
        if state is None:
            return None
        (x,) = args
        tail = state.tails.get(id(module))
        if tail is None:
            tail = x.new_zeros(x.shape[0], x.shape[1], module.padding)
        extended = torch.cat((tail, x), dim=-1)
        state.tails[id(module)] = extended[..., extended.shape[-1] - module.padding :]
        return (extended,)

    def _conv_after(self, module, args, output):
        if self._active is None:
            return None
        return output[..., module.padding :]

    # Transposed convolution: prepend the inputs whose outputs overlap this chunk's.

    def _transconv_before(self, module, args):
        state = self._active
        if state is None:
            return None
        (x,) = args
        kernel, stride = module.conv.kernel_size[0], module.conv.stride[0]
        keep = math.ceil(kernel / stride) - 1
        previous = state.tails.get(id(module))
        extended = x if previous is None else torch.cat((previous, x), dim=-1)
        if keep:
            state.tails[id(module)] = extended[..., max(0, extended.shape[-1] - keep) :]
        # Remember how many output samples belong to the prepended inputs.
        state.skips[id(module)] = (0 if previous is None else previous.shape[-1]) * stride
        return (extended,)

    def _transconv_after(self, module, args, output):
        state = self._active
        if state is None:
            return None
        return output[..., state.skips[id(module)] :]

    # Transformer: run on top of the utterance's sliding-window KV cache.

    def _attach_cache(self, module, args, kwargs):
        state = self._active
        if state is None:
            return None
        if state.kv_cache is None:
            from transformers.cache_utils import DynamicCache

            state.kv_cache = DynamicCache(config=module.config)
        kwargs = dict(kwargs, past_key_values=state.kv_cache, use_cache=True)
        return args, kwargs
