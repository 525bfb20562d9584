"""The frame-by-frame generation loop over the official talker and code predictor.

The stock package generates inside Hugging Face `generate`, calling `generate` again for the
15-step code predictor on every frame, and hands out nothing until the utterance is finished.
Here the same modules run step by step over preallocated KV caches, and each 80 ms frame
(16 codes) is handed out the moment it exists. Prompt construction and code selection follow
the package exactly, so greedy decoding yields the very codes the stock path yields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .prompt import TalkerPrompt
from .sampling import SamplingOptions, apply_repetition_penalty, choose

if TYPE_CHECKING:
    from qwen_tts.core.models import Qwen3TTSForConditionalGeneration

# The package's talker may not stop before its second frame (`min_new_tokens=2`).
MIN_FRAMES = 2


@dataclass(frozen=True)
class StopRules:
    """When an utterance ends, besides the model's end-of-speech code.

    Random or confused weights may never emit the end code (the published 0.6B-Base misses it on
    about 0.3% of requests), so each utterance gets a frame cap from its text length: speech
    runs at roughly 3-4 frames per text token, and the cap allows several times that. An
    absolute cap bounds everything.
    """

    base_frames: int = 25
    frames_per_token: float = 12.0
    max_frames: int = 1500  # 120 s

    def frame_cap(self, text_tokens: int) -> int:
        derived = self.base_frames + int(self.frames_per_token * max(text_tokens, 1))
        return max(MIN_FRAMES, min(self.max_frames, derived))


class StaticKVCache:
    """Preallocated keys and values for a stack of decoder layers, batch of one.

    The package's decoder layers take it in place of a transformers `Cache`: they only call
    `update()`, which writes the step's keys and values in place and returns views of all
    positions so far. Nothing is allocated per step unless the capacity must grow.
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


def _run_layers(layers, hidden: torch.Tensor, cache: StaticKVCache, rope) -> torch.Tensor:
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=None,  # sdpa / flash attention apply causality for multi-token input
            past_key_values=cache,
            use_cache=True,
            position_embeddings=rope,
        )[0]
    cache.advance(hidden.shape[1])
    return hidden


@dataclass
class GenerationState:
    """One utterance in progress."""

    prompt: TalkerPrompt
    sampling: SamplingOptions
    max_frames: int
    generator: torch.Generator | None
    talker_cache: StaticKVCache
    predictor_cache: StaticKVCache
    seen: torch.Tensor  # codebook-0 ids generated so far (repetition penalty)
    last_hidden: torch.Tensor | None = None  # talker output of the last position, [1, 1, D]
    next_code0: torch.Tensor | None = None  # codebook-0 id of the next frame, [1]
    frames: int = 0
    finish_reason: str | None = None  # "eos", "cap" or "cancelled"
    # The last frame's codes while its talker step waits for text that has not arrived yet.
    pending: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    @property
    def waiting_for_text(self) -> bool:
        return self.pending is not None and not self.finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class FrameGenerator:
    """Generates codec frames for one loaded model. Not thread-safe: one owner thread."""

    def __init__(self, model: "Qwen3TTSForConditionalGeneration") -> None:
        self.model = model
        talker = model.talker
        self.talker = talker
        self.predictor = talker.code_predictor
        tcfg = model.config.talker_config
        pcfg = tcfg.code_predictor_config
        self.groups = tcfg.num_code_groups
        self.eos_id = tcfg.codec_eos_token_id
        self.device = talker.device
        self.dtype = talker.dtype
        self._talker_dims = (tcfg.num_hidden_layers, tcfg.num_key_value_heads, self._head_dim(tcfg))
        self._predictor_dims = (pcfg.num_hidden_layers, pcfg.num_key_value_heads, self._head_dim(pcfg))

        vocab = tcfg.vocab_size
        ids = torch.arange(vocab, device=self.device)
        # The package suppresses the 1024 special ids at the top of the vocabulary, except EOS.
        self.suppressed = (ids >= vocab - 1024) & (ids != self.eos_id)
        self.eos_mask = ids == self.eos_id

        positions = torch.arange(self.groups, device=self.device).unsqueeze(0)
        # The rotary modules only read the dtype and device of their first argument.
        self._probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        # Code-predictor positions restart at 0 every frame: one rotary table serves all frames.
        self._predictor_rope = self.predictor.model.rotary_emb(self._probe, positions)

    @staticmethod
    def _head_dim(config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def _talker_rope(self, start: int, length: int):
        positions = torch.arange(start, start + length, device=self.device).view(1, 1, -1).expand(3, 1, -1)
        return self.talker.model.rotary_emb(self._probe, positions)

    def _talker_forward(self, state: GenerationState, embeds: torch.Tensor) -> torch.Tensor:
        rope = self._talker_rope(state.talker_cache.length, embeds.shape[1])
        hidden = _run_layers(self.talker.model.layers, embeds, state.talker_cache, rope)
        return self.talker.model.norm(hidden)[:, -1:]

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
            max_frames=max(MIN_FRAMES, max_frames),
            generator=generator,
            talker_cache=StaticKVCache(layers, kv_heads, head_dim, capacity, self.dtype, self.device),
            predictor_cache=StaticKVCache(*self._predictor_dims, self.groups, self.dtype, self.device),
            seen=torch.zeros_like(self.suppressed),
        )
        with torch.inference_mode():
            hidden = self._talker_forward(state, prompt.prefill.to(self.dtype))
            state.last_hidden = hidden
            state.next_code0 = self._choose_code0(state, hidden, generated=0)
        return state

    def _predict_rest(self, state: GenerationState, code0: torch.Tensor) -> list[torch.Tensor]:
        """Codebooks 1-15 for this frame, one code-predictor step each."""
        s = state.sampling
        cache = state.predictor_cache
        cache.reset()
        predictor = self.predictor
        embeds = torch.cat((state.last_hidden, self.talker.get_input_embeddings()(code0).unsqueeze(1)), dim=1)
        codes: list[torch.Tensor] = []
        for step in range(self.groups - 1):
            if step > 0:
                embeds = predictor.model.codec_embedding[step - 1](codes[-1]).unsqueeze(1)
            start = cache.length
            cos, sin = self._predictor_rope
            rope = (cos[:, start : start + embeds.shape[1]], sin[:, start : start + embeds.shape[1]])
            hidden = _run_layers(predictor.model.layers, predictor.small_to_mtp_projection(embeds), cache, rope)
            hidden = predictor.model.norm(hidden)
            logits = predictor.lm_head[step](hidden[:, -1]).float()
            codes.append(
                choose(logits, s.subtalker_do_sample, s.subtalker_temperature, s.subtalker_top_k, s.subtalker_top_p, state.generator)
            )
        return codes

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
            rest = self._predict_rest(state, code0)
            frame = torch.cat([code0] + rest)
            state.frames += 1
            if state.frames >= state.max_frames:
                state.finish_reason = "cap"
                return frame
            state.pending = (code0, rest)
            self._advance_talker(state)
        return frame

    def _advance_talker(self, state: GenerationState) -> bool:
        """Feed the last frame (and its text) to the talker; False while the text is missing."""
        text = state.prompt.text_track.at(state.frames - 1)
        if text is None:
            return False
        code0, rest = state.pending
        embeds = torch.cat(
            [self.talker.get_input_embeddings()(code0).unsqueeze(1)]
            + [self.predictor.model.codec_embedding[i](rest[i]).unsqueeze(1) for i in range(self.groups - 1)],
            dim=1,
        ).sum(1, keepdim=True)
        state.last_hidden = self._talker_forward(state, embeds + text)
        state.next_code0 = self._choose_code0(state, state.last_hidden, generated=state.frames)
        state.pending = None
        return True

    def cancel(self, state: GenerationState) -> None:
        if not state.finished:
            state.finish_reason = "cancelled"
