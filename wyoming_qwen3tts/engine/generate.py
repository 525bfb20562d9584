"""The frame-by-frame generation loop over the official talker and code predictor.

The stock package generates inside Hugging Face `generate`, calling `generate` again for the
15-step code predictor on every frame, and hands out nothing until the utterance is finished.
Here the same weights run step by step, through plain tensor functions (`layers.py`) over a
preallocated talker KV cache, the code predictor's 15 steps as one loop (`predictor.py`), and
each 80 ms frame (16 codes) is handed out the moment it exists. Prompt construction and code
selection follow the package exactly, so greedy decoding yields the very codes the stock path
yields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .layers import DecoderStack
from .options import MIN_FRAMES
from .predictor import CodePredictorLoop, PredictorSampling
from .prompt import TalkerPrompt
from .timings import StageTimings
from .sampling import SamplingOptions, apply_repetition_penalty, choose

if TYPE_CHECKING:
    from qwen_tts.core.models import Qwen3TTSForConditionalGeneration



class StaticKVCache:
    """Preallocated keys and values for a stack of decoder layers, batch of one.

    `update()` writes the step's keys and values in place and returns views of all positions so
    far, the way a transformers `Cache` does (the package's own layers accept it too). Nothing is
    allocated per step unless the capacity must grow.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (layers, 1, kv_heads, max(capacity, 1), head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reset(self) -> None:
        self.length = 0

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (capacity,) + old.shape[4:])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.keys[layer_idx, :, :, self.length : end] = key_states
        self.values[layer_idx, :, :, self.length : end] = value_states
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps


@dataclass
class GenerationState:
    """One utterance in progress."""

    prompt: TalkerPrompt
    sampling: SamplingOptions
    predictor_sampling: PredictorSampling  # the code predictor's part of ``sampling``
    max_frames: int
    generator: torch.Generator | None
    talker_cache: StaticKVCache
    seen: torch.Tensor  # codebook-0 ids generated so far (repetition penalty)
    last_hidden: torch.Tensor | None = None  # talker output of the last position, [1, 1, D]
    next_code0: torch.Tensor | None = None  # codebook-0 id of the next frame, [1]
    frames: int = 0
    finish_reason: str | None = None  # "eos", "cap" or "cancelled"
    # The last frame's codes [16] while its talker step waits for text that has not arrived yet.
    pending: torch.Tensor | None = None

    @property
    def waiting_for_text(self) -> bool:
        return self.pending is not None and not self.finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class FrameGenerator:
    """Generates codec frames for one loaded model. Not thread-safe: one owner thread."""

    def __init__(self, model: "Qwen3TTSForConditionalGeneration", compile: bool = False) -> None:
        self.model = model
        talker = model.talker
        self.talker = talker
        tcfg = model.config.talker_config
        self.groups = tcfg.num_code_groups
        self.eos_id = tcfg.codec_eos_token_id
        self.device = talker.device
        self.dtype = talker.dtype
        self.stack = DecoderStack.of(talker.model, tcfg)
        self._talker_dims = (tcfg.num_hidden_layers, tcfg.num_key_value_heads, self.stack.head_dim)
        self.code_embeddings = (talker.get_input_embeddings(),) + tuple(talker.code_predictor.model.codec_embedding)
        self.predictor = CodePredictorLoop(talker.code_predictor, talker.get_input_embeddings(), self.groups, compile)

        vocab = tcfg.vocab_size
        ids = torch.arange(vocab, device=self.device)
        # The package suppresses the 1024 special ids at the top of the vocabulary, except EOS.
        self.suppressed = (ids >= vocab - 1024) & (ids != self.eos_id)
        self.eos_mask = ids == self.eos_id
        # The rotary module only reads the dtype and device of its first argument.
        self._probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        self.frames_generated = 0  # every frame since load, all utterances: for monitoring and tests
        self.timings = StageTimings()  # seconds in the talker and the code predictor

    def warm_up(self, sampling: SamplingOptions) -> None:
        """Compile the code predictor for the checkpoint's default sampling, if compiling."""
        self.predictor.warm_up(PredictorSampling.of(sampling))

    def _talker_rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + length, device=self.device).view(1, 1, -1).expand(3, 1, -1)
        cos, sin = self.talker.model.rotary_emb(self._probe, positions)
        # Speech has one position stream: the three multimodal sections hold the same angles, so
        # the package's section merge yields the first stream's table unchanged.
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)

    def _talker_forward(self, state: GenerationState, embeds: torch.Tensor) -> torch.Tensor:
        cos, sin = self._talker_rope(state.talker_cache.length, embeds.shape[1])
        return self.stack.forward(embeds, cos, sin, state.talker_cache)[:, -1:]

    def _choose_code0(self, state: GenerationState, hidden: torch.Tensor, generated: int) -> torch.Tensor:
        s = state.sampling
        logits = self.talker.codec_head(hidden[:, -1]).float()
        logits = apply_repetition_penalty(logits, state.seen, s.repetition_penalty)
        if generated < MIN_FRAMES:
            logits = logits.masked_fill(self.eos_mask, -float("inf"))
        logits = logits.masked_fill(self.suppressed, -float("inf"))
        code = choose(logits, s.do_sample, s.temperature, s.top_k, s.top_p, state.generator)
        state.seen[code] = True
        return code

    def start(self, prompt: TalkerPrompt, sampling: SamplingOptions, max_frames: int) -> GenerationState:
        """Prefill the talker with ``prompt``; the first frame is generated by `step`."""
        generator = None
        if sampling.do_sample or sampling.subtalker_do_sample:
            generator = torch.Generator(device=self.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
        layers, kv_heads, head_dim = self._talker_dims
        # Room for a typical sentence up front; the cache grows if an utterance runs longer.
        capacity = prompt.prefill.shape[1] + min(max_frames, 512) + 1
        state = GenerationState(
            prompt=prompt,
            sampling=sampling,
            predictor_sampling=PredictorSampling.of(sampling),
            max_frames=max(MIN_FRAMES, max_frames),
            generator=generator,
            talker_cache=StaticKVCache(layers, kv_heads, head_dim, capacity, self.dtype, self.device),
            seen=torch.zeros_like(self.suppressed),
        )
        with torch.inference_mode():
            hidden = self._talker_forward(state, prompt.prefill.to(self.dtype))
            state.last_hidden = hidden
            state.next_code0 = self._choose_code0(state, hidden, generated=0)
        return state

    def step(self, state: GenerationState) -> torch.Tensor | None:
        """Generate the next frame: its 16 codes on the model's device.

        None when the utterance is finished, or while it waits for text (`waiting_for_text`).
        """
        if state.finished:
            return None
        with torch.inference_mode():
            if state.pending is not None and not self._advance_talker(state):
                return None
            if state.frames >= state.max_frames:
                state.finish_reason = "cap"
                return None
            code0 = state.next_code0
            if int(code0.item()) == self.eos_id:
                state.finish_reason = "eos"
                return None
            started = time.perf_counter()
            rest = self.predictor.codes(state.last_hidden, code0, state.predictor_sampling, state.generator)
            self.timings.add("predictor", time.perf_counter() - started)
            frame = torch.cat((code0, rest))
            state.frames += 1
            self.frames_generated += 1
            if state.frames >= state.max_frames:
                state.finish_reason = "cap"
                return frame
            state.pending = frame
            self._advance_talker(state)
        return frame

    def force(self, state: GenerationState, frame: torch.Tensor) -> None:
        """Feed ``frame`` [16] to the talker as if it had been generated (teacher forcing).

        For measuring a model against another on the same history (quantization quality).
        """
        with torch.inference_mode():
            state.pending = frame
            state.frames += 1
            if not self._advance_talker(state):
                raise ValueError("teacher forcing needs the whole text up front")

    def _advance_talker(self, state: GenerationState) -> bool:
        """Feed the last frame (and its text) to the talker; False while the text is missing."""
        text = state.prompt.text_track.at(state.frames - 1)
        if text is None:
            return False
        started = time.perf_counter()
        frame = state.pending
        embeds = torch.cat(
            [embedding(frame[i : i + 1]).unsqueeze(1) for i, embedding in enumerate(self.code_embeddings)], dim=1
        ).sum(1, keepdim=True)
        state.last_hidden = self._talker_forward(state, embeds + text)
        state.next_code0 = self._choose_code0(state, state.last_hidden, generated=state.frames)
        state.pending = None
        self.timings.add("talker", time.perf_counter() - started)
        return True

    def cancel(self, state: GenerationState) -> None:
        if not state.finished:
            state.finish_reason = "cancelled"
