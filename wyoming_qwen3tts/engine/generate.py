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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cuda_graphs import CudaGraphRecorder
from .kv_cache import KVSlots, PaddedRows, RowCaches, SlotKVCache, StaticKVCache
from .layers import DecoderStack, signed_sin
from .options import MIN_FRAMES
from .predictor import CodePredictorLoop, PredictorSampling
from .prompt import TalkerPrompt
from .prompt_prefixes import DEFAULT_BUDGET_BYTES, PromptPrefixCache
from .timings import StageTimings
from .sampling import ExponentialNoise, SamplingOptions, apply_repetition_penalty, choose

if TYPE_CHECKING:
    from qwen_tts.core.models import Qwen3TTSForConditionalGeneration


@dataclass
class GenerationState:
    """One utterance in progress."""

    prompt: TalkerPrompt
    sampling: SamplingOptions
    predictor_sampling: PredictorSampling  # the code predictor's part of ``sampling``
    max_frames: int
    noise: ExponentialNoise | None  # the random numbers its sampling draws (None: greedy)
    talker_cache: StaticKVCache | SlotKVCache
    seen: torch.Tensor  # codebook-0 ids generated so far (repetition penalty)
    last_hidden: torch.Tensor | None = None  # talker output of the last position, [1, 1, D]
    next_code0: torch.Tensor | None = None  # codebook-0 id of the next frame, [1]
    frames: int = 0
    finish_reason: str | None = None  # "eos", "cap" or "cancelled"
    # The last frame's codes [16], until the talker has read them (with the text of that step).
    pending: torch.Tensor | None = None

    @property
    def text_ready(self) -> bool:
        """Whether the text the talker reads beside the last frame has arrived."""
        return self.pending is None or self.prompt.text_track.at(self.frames - 1) is not None

    @property
    def waiting_for_text(self) -> bool:
        return not self.finished and not self.text_ready

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        """End the utterance ("eos", "cap" or "cancelled"); its talker history is no longer needed."""
        self.finish_reason = reason
        self.talker_cache.release()


class FrameGenerator:
    """Generates codec frames for one loaded model. Not thread-safe: one owner thread."""

    def __init__(
        self,
        model: "Qwen3TTSForConditionalGeneration",
        compile: bool = False,
        padded_attention: bool = False,
        prefix_budget_bytes: int = DEFAULT_BUDGET_BYTES,
        cuda_graphs: bool = True,
    ) -> None:
        """``padded_attention``: keep the rows' talker histories in one padded tensor and attend in
        one masked call per layer (`kv_cache.PaddedRows`), rather than one call per row.
        ``prefix_budget_bytes``: memory for the histories of voices' prompt beginnings (0: none kept).
        ``cuda_graphs``: on a GPU, record the code predictor's loop as CUDA graphs (when not compiling)."""
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
        self.slots = KVSlots(*self._talker_dims, self.dtype, self.device) if padded_attention else None
        self.code_embeddings = (talker.get_input_embeddings(),) + tuple(talker.code_predictor.model.codec_embedding)
        recorder = CudaGraphRecorder() if cuda_graphs and self.device.type == "cuda" else None
        self.predictor = CodePredictorLoop(talker.code_predictor, talker.get_input_embeddings(), self.groups, compile, recorder)
        self.prefixes = PromptPrefixCache(prefix_budget_bytes)

        vocab = tcfg.vocab_size
        ids = torch.arange(vocab, device=self.device)
        # The package suppresses the 1024 special ids at the top of the vocabulary, except EOS.
        self.suppressed = (ids >= vocab - 1024) & (ids != self.eos_id)
        self.eos_mask = ids == self.eos_id
        # The rotary module only reads the dtype and device of its first argument.
        self._probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        self.frames_generated = 0  # every frame since load, all utterances: for monitoring and tests
        self.timings = StageTimings()  # seconds in the talker and the code predictor

    def warm_up(self, sampling: SamplingOptions, max_rows: int = 2) -> None:
        """Compile (or record) the code predictor for the checkpoint's default sampling, if
        compiling (or recording), for batches of up to ``max_rows`` rows."""
        self.predictor.warm_up(PredictorSampling.of(sampling), max_rows)

    def _talker_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables [B, 1, n, head_dim] for ``positions`` [B, n], as `DecoderStack.forward` takes them."""
        cos, sin = self.talker.model.rotary_emb(self._probe, positions.unsqueeze(0).expand(3, -1, -1))
        # Speech has one position stream: the three multimodal sections hold the same angles, so
        # the package's section merge yields the first stream's table unchanged.
        return cos[0].unsqueeze(1), signed_sin(sin[0].unsqueeze(1))

    def _choose_code0(self, rows: list[GenerationState], logits: torch.Tensor) -> None:
        """Codebook 0 of each row's next frame from the talker's logits [B, vocab] (float32).

        Rows with the same settings choose together; each draws its own random numbers.
        """
        groups: dict[tuple, list[int]] = {}
        for i, state in enumerate(rows):
            s = state.sampling
            groups.setdefault((s.do_sample, s.temperature, s.top_k, s.top_p, s.repetition_penalty), []).append(i)
        for (do_sample, temperature, top_k, top_p, penalty), members in groups.items():
            group = [rows[i] for i in members]
            chosen = logits if len(members) == len(rows) else logits[members]
            chosen = apply_repetition_penalty(chosen, torch.stack([s.seen for s in group]), penalty)
            # The package may not stop before its second frame.
            early = torch.tensor([s.frames < MIN_FRAMES for s in group], device=self.device).unsqueeze(1)
            chosen = chosen.masked_fill(early & self.eos_mask, -float("inf"))
            chosen = chosen.masked_fill(self.suppressed, -float("inf"))
            codes = choose(chosen, do_sample, temperature, top_k, top_p, [s.noise for s in group])
            for state, code in zip(group, codes.split(1)):
                state.seen[code] = True
                state.next_code0 = code

    def prefill(self, prompt: TalkerPrompt, sampling: SamplingOptions, max_frames: int) -> GenerationState:
        """Run the talker over ``prompt``: the state of one utterance, whose frames `step` makes."""
        noise = None
        if sampling.do_sample or sampling.subtalker_do_sample:
            generator = torch.Generator(device=self.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
            noise = ExponentialNoise(generator, stock_stream=sampling.seed is not None)
        layers, kv_heads, head_dim = self._talker_dims
        # Room for a typical sentence up front; the cache grows if an utterance runs longer.
        capacity = prompt.prefill.shape[1] + min(max_frames, 512) + 1
        state = GenerationState(
            prompt=prompt,
            sampling=sampling,
            predictor_sampling=PredictorSampling.of(sampling),
            max_frames=max(MIN_FRAMES, max_frames),
            noise=noise,
            talker_cache=self.slots.take(capacity)
            if self.slots is not None
            else StaticKVCache(layers, kv_heads, head_dim, capacity, self.dtype, self.device),
            seen=torch.zeros_like(self.suppressed),
        )
        with torch.inference_mode():
            embeds = prompt.prefill.to(self.dtype)
            cache = state.talker_cache
            # The voice's beginning runs on its own, then the rest after it, whether or not its
            # history was kept from an earlier prefill: the same arithmetic either way, so a
            # request's codes never depend on what ran before it (one pass over all positions
            # rounds differently, which int8 activations can turn into other codes). The last
            # position is never part of it: its output chooses the first code.
            shared = min(prompt.shared, embeds.shape[1] - 1)
            if shared:
                beginning = embeds[:, :shared]
                known = self.prefixes.find(beginning)
                if known is None:
                    self._talker_pass(beginning, cache)
                    self.prefixes.keep(beginning, *cache.history(shared))
                else:
                    cache.start_from(known.keys, known.values)
            hidden = self._talker_pass(embeds[:, shared:], cache)[:, -1:]
            state.last_hidden = hidden
            self._choose_code0([state], self.talker.codec_head(hidden[:, -1]).float())
        return state

    def _talker_pass(self, embeds: torch.Tensor, cache) -> torch.Tensor:
        """The talker over ``embeds`` [1, n, D], continuing one utterance's history ``cache``."""
        positions = torch.arange(cache.length, cache.length + embeds.shape[1], device=self.device).unsqueeze(0)
        cos, sin = self._talker_rope(positions)
        return self.stack.forward(embeds, cos, sin, cache)

    def step(self, states: Sequence[GenerationState]) -> list[torch.Tensor | None]:
        """The next frame of every state, as one batch: its 16 codes on the model's device.

        A row's entry is None when its utterance is finished, or while it waits for text
        (`waiting_for_text`). The talker reads the rows' previous frames in one batched pass (each
        row attending to its own history), then the code predictor makes all rows' codebooks 1-15
        in one batched loop; each row samples with its own options and random numbers, so a
        seeded request draws the same numbers alone or in company.
        """
        frames: list[torch.Tensor | None] = [None] * len(states)
        with torch.inference_mode():
            feeding = [s for s in states if s.pending is not None and not s.finished and s.text_ready]
            if feeding:
                self._advance_talker(feeding)
            candidates = [i for i, s in enumerate(states) if not s.finished and s.pending is None]
            if not candidates:
                return frames
            # One host sync for the whole batch.
            is_eos = (torch.cat([states[i].next_code0 for i in candidates]) == self.eos_id).tolist()
            ready = []
            for i, eos in zip(candidates, is_eos):
                state = states[i]
                if state.frames >= state.max_frames:
                    state.finish("cap")
                elif eos:
                    state.finish("eos")
                else:
                    ready.append(i)
            if not ready:
                return frames
            rows = [states[i] for i in ready]
            started = time.perf_counter()
            code0 = torch.cat([s.next_code0 for s in rows])
            rest = self.predictor.codes(
                torch.cat([s.last_hidden for s in rows]),
                code0,
                [s.predictor_sampling for s in rows],
                [s.noise for s in rows],
            )
            self.timings.add("predictor", time.perf_counter() - started, len(rows))
            made = torch.cat((code0.unsqueeze(1), rest), dim=1)
            for i, state, frame in zip(ready, rows, made):
                state.frames += 1
                if state.frames >= state.max_frames:
                    state.finish("cap")
                else:
                    state.pending = frame  # the talker reads it at the next step
                frames[i] = frame
            self.frames_generated += len(rows)
        return frames

    def force(self, state: GenerationState, frame: torch.Tensor) -> None:
        """Feed ``frame`` [16] to the talker as if it had been generated (teacher forcing).

        For measuring a model against another on the same history (quantization quality).
        """
        if state.pending is not None or not state.prompt.text_track.complete:
            raise ValueError("teacher forcing needs the whole text up front and no frame in flight")
        with torch.inference_mode():
            state.pending = frame
            state.frames += 1
            self._advance_talker([state])

    def _advance_talker(self, rows: list[GenerationState]) -> None:
        """Feed each row's last frame (and its text) to the talker; choose each row's next codebook 0."""
        started = time.perf_counter()
        frames = torch.stack([s.pending for s in rows])
        embeds = torch.cat(
            [embedding(frames[:, i : i + 1]) for i, embedding in enumerate(self.code_embeddings)], dim=1
        ).sum(1, keepdim=True)
        text = torch.cat([s.prompt.text_track.at(s.frames - 1) for s in rows])
        positions = torch.tensor([[s.talker_cache.length] for s in rows], device=self.device)
        cos, sin = self._talker_rope(positions)
        caches = [s.talker_cache for s in rows]
        batch = PaddedRows(caches) if self.slots is not None and len(rows) > 1 else RowCaches(caches)
        hidden = self.stack.forward(embeds + text, cos, sin, batch)
        self._choose_code0(rows, self.talker.codec_head(hidden[:, -1]).float())
        for i, state in enumerate(rows):
            state.last_hidden = hidden[i : i + 1]
            state.pending = None
        self.timings.add("talker", time.perf_counter() - started, len(rows))
