"""The talker's input for one utterance: prefill embeddings and the text track that follows.

This mirrors `Qwen3TTSForConditionalGeneration.generate` of the official package for a batch of
one, so our frame loop starts from exactly the state the stock path starts from. Both of the
package's text modes are supported:

* ``non_streaming_mode=True``: the whole text sits in the prefill; generation then sees padding.
* ``non_streaming_mode=False`` ("dual track"): the prefill holds the first text token and each
  generation step adds the next text token to the audio input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..speech import ClonePrompt, PresetSpeaker

if TYPE_CHECKING:
    from qwen_tts import Qwen3TTSModel


# The voices the local engine speaks.
VoiceSpec = PresetSpeaker | ClonePrompt


class TextTrack:
    """What the talker adds to its audio input at each generation step.

    Step g adds item g: the text's token embeddings (dual track) or nothing of the text (it sat
    in the prefill), then the end-of-text embedding, then padding for ever. While text is still
    arriving, a step beyond the known items is not known yet (None): generation waits.
    """

    def __init__(self, pad: torch.Tensor, items: torch.Tensor | None = None, complete: bool = True) -> None:
        self.pad = pad  # [1, 1, hidden]
        self.items = items if items is not None else pad[:, :0]
        self.complete = complete

    def extend(self, embeds: torch.Tensor) -> None:
        self.items = torch.cat((self.items, embeds), dim=1)

    def close(self, end: torch.Tensor | None) -> None:
        if end is not None:
            self.extend(end)
        self.complete = True

    def at(self, step: int) -> torch.Tensor | None:
        if step < self.items.shape[1]:
            return self.items[:, step : step + 1]
        return self.pad if self.complete else None


@dataclass
class TalkerPrompt:
    """Everything the frame loop needs to start one utterance."""

    prefill: torch.Tensor  # [1, L, hidden]
    text_track: TextTrack
    text_tokens: int  # tokens of the utterance's own text (so far, while it streams in)
    ref_codes: torch.Tensor | None  # in-context clone: codes that precede the generated frames
    # Leading prefill positions that depend on the voice, language and instruction only, not on
    # the text: the same for every utterance in that voice (`prompt_prefixes.py`).
    shared: int = 0


def _template(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _ref_template(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


def _instruct_template(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n"


def supported_languages(wrapper: "Qwen3TTSModel") -> list[str]:
    """Languages a request may name, as the package spells them ("auto" first)."""
    return list(wrapper.model.get_supported_languages())


def resolve_language(wrapper: "Qwen3TTSModel", language: str | None) -> str:
    """Normalise a language name; raise ValueError naming the valid ones."""
    name = (language or "auto").strip().lower()
    valid = supported_languages(wrapper)
    if name not in valid:
        raise ValueError(f"Unknown language {language!r}; this model knows: {', '.join(valid)}")
    return name


def tokenize(wrapper: "Qwen3TTSModel", text: str) -> torch.Tensor:
    """Token ids of the package's chat template around ``text``: [1, n]."""
    return wrapper._tokenize_texts([_template(text)])[0]


@dataclass
class _Head:
    """The prompt up to the utterance's text, and the embeddings around it."""

    prefill: torch.Tensor
    codec_last: torch.Tensor  # codec input at the first text position
    tts_eos: torch.Tensor
    tts_pad: torch.Tensor


def _text_embed(wrapper: "Qwen3TTSModel", ids: torch.Tensor) -> torch.Tensor:
    talker = wrapper.model.talker
    return talker.text_projection(talker.get_text_embeddings()(ids))


def _codec_embed(wrapper: "Qwen3TTSModel", ids: list[int]) -> torch.Tensor:
    talker = wrapper.model.talker
    return talker.get_input_embeddings()(torch.tensor([ids], device=talker.device, dtype=torch.long))


def _head(wrapper: "Qwen3TTSModel", voice: VoiceSpec, language: str, instruct: str | None) -> _Head:
    model = wrapper.model
    talker = model.talker
    cfg = model.config
    tcfg = cfg.talker_config
    device = talker.device
    language = resolve_language(wrapper, language)

    speaker_name: str | None = None
    if isinstance(voice, PresetSpeaker):
        speaker_name = voice.name.lower()
        if speaker_name not in tcfg.spk_id:
            raise ValueError(f"Unknown speaker {voice.name!r}; this model has: {', '.join(tcfg.spk_id)}")
        speaker_embed = talker.get_input_embeddings()(
            torch.tensor(tcfg.spk_id[speaker_name], device=device, dtype=torch.long)
        )
    else:
        speaker_embed = voice.speaker_embedding.to(device=device, dtype=talker.dtype)

    language_id = None if language == "auto" else tcfg.codec_language_id[language]
    if language in ("chinese", "auto") and speaker_name is not None:
        dialect = tcfg.spk_is_dialect[speaker_name]
        if dialect is not False:
            language_id = tcfg.codec_language_id[dialect]

    tts_bos, tts_eos, tts_pad = _text_embed(
        wrapper,
        torch.tensor([[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]], device=device, dtype=torch.long),
    ).chunk(3, dim=1)

    if language_id is None:
        think = [tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id]
    else:
        think = [tcfg.codec_think_id, tcfg.codec_think_bos_id, language_id, tcfg.codec_think_eos_id]
    codec_input = torch.cat(
        [
            _codec_embed(wrapper, think),
            speaker_embed.view(1, 1, -1),
            _codec_embed(wrapper, [tcfg.codec_pad_id, tcfg.codec_bos_id]),
        ],
        dim=1,
    )
    # "<|im_start|>assistant\n": the same three tokens whatever the text.
    role = _text_embed(wrapper, tokenize(wrapper, "x")[:, :3])
    tags = torch.cat((tts_pad.expand(-1, codec_input.shape[1] - 2, -1), tts_bos), dim=1) + codec_input[:, :-1]
    prefill = torch.cat((role, tags), dim=1)
    # Instructions steer preset speakers; the 0.6B checkpoints drop them, as the package does.
    if instruct and speaker_name is not None and model.tts_model_size not in "0b6":
        instruct_id = wrapper._tokenize_texts([_instruct_template(instruct)])[0]
        prefill = torch.cat([_text_embed(wrapper, instruct_id), prefill], dim=1)
    return _Head(prefill, codec_input[:, -1:], tts_eos, tts_pad)


@torch.inference_mode()
def build_prompt(
    wrapper: "Qwen3TTSModel",
    text: str,
    voice: VoiceSpec,
    language: str = "auto",
    non_streaming_mode: bool = True,
    instruct: str | None = None,
) -> TalkerPrompt:
    """The talker input for ``text`` in ``voice``, exactly as the official generate builds it."""
    tcfg = wrapper.model.config.talker_config
    input_id = tokenize(wrapper, text)
    text_tokens = int(input_id.shape[1]) - 8
    if text_tokens < 1:
        raise ValueError("Nothing to speak: the text has no tokens")
    head = _head(wrapper, voice, language, instruct)
    prefill = head.prefill
    shared = prefill.shape[1]

    ref_codes = None
    if isinstance(voice, ClonePrompt) and not voice.x_vector_only:
        ref_codes = voice.ref_codes.to(prefill.device)
        ref_id = wrapper._tokenize_texts([_ref_template(voice.ref_text or "")])[0][:, 3:-2]
        icl_embed, trailing = wrapper.model.generate_icl_prompt(
            text_id=input_id[:, 3:-5],
            ref_id=ref_id,
            ref_code=ref_codes,
            tts_pad_embed=head.tts_pad,
            tts_eos_embed=head.tts_eos,
            non_streaming_mode=non_streaming_mode,
        )
        prefill = torch.cat([prefill, icl_embed], dim=1)
        # The sample's transcript comes first in the clone's text, whichever text follows it.
        shared += ref_id.shape[1]
    elif non_streaming_mode:
        body = input_id[:, 3:-5]
        pads = _codec_embed(wrapper, [tcfg.codec_pad_id] * (body.shape[1] + 1))
        prefill = torch.cat(
            [
                prefill,
                torch.cat((_text_embed(wrapper, body), head.tts_eos), dim=1) + pads,
                head.tts_pad + _codec_embed(wrapper, [tcfg.codec_bos_id]),
            ],
            dim=1,
        )
        trailing = head.tts_pad
    else:
        prefill = torch.cat([prefill, _text_embed(wrapper, input_id[:, 3:4]) + head.codec_last], dim=1)
        trailing = torch.cat((_text_embed(wrapper, input_id[:, 4:-5]), head.tts_eos), dim=1)

    return TalkerPrompt(
        prefill=prefill,
        text_track=TextTrack(head.tts_pad, trailing, complete=True),
        text_tokens=text_tokens,
        ref_codes=ref_codes,
        shared=shared,
    )


class DualTrackPrompt:
    """A dual-track prompt whose text is still arriving, token by token."""

    def __init__(self, wrapper: "Qwen3TTSModel", voice: VoiceSpec, language: str, instruct: str | None) -> None:
        if isinstance(voice, ClonePrompt) and not voice.x_vector_only:
            raise ValueError("in-context clones need their whole text up front")
        self.wrapper = wrapper
        with torch.inference_mode():
            self._head = _head(wrapper, voice, language, instruct)
        self.prompt: TalkerPrompt | None = None

    @torch.inference_mode()
    def add_tokens(self, ids: list[int]) -> None:
        """Committed text tokens, in order: the first completes the prefill."""
        if not ids:
            return
        device = self._head.prefill.device
        tensor = torch.tensor([ids], device=device, dtype=torch.long)
        if self.prompt is None:
            prefill = torch.cat([self._head.prefill, _text_embed(self.wrapper, tensor[:, :1]) + self._head.codec_last], dim=1)
            self.prompt = TalkerPrompt(
                prefill=prefill,
                text_track=TextTrack(self._head.tts_pad, complete=False),
                text_tokens=1,
                ref_codes=None,
                shared=self._head.prefill.shape[1],
            )
            tensor = tensor[:, 1:]
        if tensor.shape[1]:
            self.prompt.text_track.extend(_text_embed(self.wrapper, tensor))
            self.prompt.text_tokens += tensor.shape[1]

    def finish(self) -> None:
        """The text is complete: end-of-text, then padding."""
        if self.prompt is not None:
            self.prompt.text_track.close(self._head.tts_eos)
