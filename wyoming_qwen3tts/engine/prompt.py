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

if TYPE_CHECKING:
    from qwen_tts import Qwen3TTSModel


@dataclass(frozen=True)
class PresetSpeaker:
    """One of the speakers in a CustomVoice checkpoint's table."""

    name: str


@dataclass(frozen=True)
class ClonePrompt:
    """A voice cloned from a reference sample (Base checkpoint).

    ``ref_codes`` (frames x 16) and ``ref_text`` are set in in-context mode; x-vector-only mode
    uses the speaker embedding alone.
    """

    speaker_embedding: torch.Tensor
    ref_codes: torch.Tensor | None = None
    ref_text: str | None = None

    @property
    def x_vector_only(self) -> bool:
        return self.ref_codes is None


VoiceSpec = PresetSpeaker | ClonePrompt


@dataclass
class TalkerPrompt:
    """Everything the frame loop needs to start one utterance."""

    prefill: torch.Tensor  # [1, L, hidden]
    text_track: torch.Tensor  # [1, T, hidden]: added to the audio input at steps 0..T-1
    tts_pad: torch.Tensor  # [1, 1, hidden]: added once the text track is used up
    text_tokens: int  # tokens of the utterance's own text
    ref_codes: torch.Tensor | None  # in-context clone: codes that precede the generated frames


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
    model = wrapper.model
    talker = model.talker
    cfg = model.config
    tcfg = cfg.talker_config
    device = talker.device
    language = resolve_language(wrapper, language)

    input_id = tokenize(wrapper, text)
    text_tokens = int(input_id.shape[1]) - 8
    if text_tokens < 1:
        raise ValueError("Nothing to speak: the text has no tokens")

    def text_embed(ids: torch.Tensor) -> torch.Tensor:
        return talker.text_projection(talker.get_text_embeddings()(ids))

    def codec_embed(ids: list[int]) -> torch.Tensor:
        return talker.get_input_embeddings()(torch.tensor([ids], device=device, dtype=input_id.dtype))

    speaker_name: str | None = None
    if isinstance(voice, PresetSpeaker):
        speaker_name = voice.name.lower()
        if speaker_name not in tcfg.spk_id:
            raise ValueError(f"Unknown speaker {voice.name!r}; this model has: {', '.join(tcfg.spk_id)}")
        speaker_embed = talker.get_input_embeddings()(
            torch.tensor(tcfg.spk_id[speaker_name], device=device, dtype=input_id.dtype)
        )
    else:
        speaker_embed = voice.speaker_embedding.to(device=device, dtype=talker.dtype)

    language_id = None if language == "auto" else tcfg.codec_language_id[language]
    if language in ("chinese", "auto") and speaker_name is not None:
        dialect = tcfg.spk_is_dialect[speaker_name]
        if dialect is not False:
            language_id = tcfg.codec_language_id[dialect]

    tts_bos, tts_eos, tts_pad = text_embed(
        torch.tensor(
            [[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]],
            device=device,
            dtype=input_id.dtype,
        )
    ).chunk(3, dim=1)

    if language_id is None:
        think = [tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id]
    else:
        think = [tcfg.codec_think_id, tcfg.codec_think_bos_id, language_id, tcfg.codec_think_eos_id]
    codec_input = torch.cat(
        [codec_embed(think), speaker_embed.view(1, 1, -1), codec_embed([tcfg.codec_pad_id, tcfg.codec_bos_id])],
        dim=1,
    )

    role = text_embed(input_id[:, :3])
    tags = torch.cat((tts_pad.expand(-1, codec_input.shape[1] - 2, -1), tts_bos), dim=1) + codec_input[:, :-1]
    prefill = torch.cat((role, tags), dim=1)

    ref_codes = None
    if isinstance(voice, ClonePrompt) and not voice.x_vector_only:
        ref_codes = voice.ref_codes.to(device)
        ref_id = wrapper._tokenize_texts([_ref_template(voice.ref_text or "")])[0]
        icl_embed, text_track = model.generate_icl_prompt(
            text_id=input_id[:, 3:-5],
            ref_id=ref_id[:, 3:-2],
            ref_code=ref_codes,
            tts_pad_embed=tts_pad,
            tts_eos_embed=tts_eos,
            non_streaming_mode=non_streaming_mode,
        )
        prefill = torch.cat([prefill, icl_embed], dim=1)
    else:
        first_text = text_embed(input_id[:, 3:4]) + codec_input[:, -1:]
        if non_streaming_mode:
            body = input_id[:, 3:-5]
            pads = codec_embed([tcfg.codec_pad_id] * (body.shape[1] + 1))
            prefill = torch.cat(
                [prefill, torch.cat((text_embed(body), tts_eos), dim=1) + pads, tts_pad + codec_embed([tcfg.codec_bos_id])],
                dim=1,
            )
            text_track = tts_pad
        else:
            prefill = torch.cat([prefill, first_text], dim=1)
            text_track = torch.cat((text_embed(input_id[:, 4:-5]), tts_eos), dim=1)

    # Instructions steer preset speakers; the 0.6B checkpoints drop them, as the package does.
    if instruct and speaker_name is not None and model.tts_model_size not in "0b6":
        instruct_id = wrapper._tokenize_texts([_instruct_template(instruct)])[0]
        prefill = torch.cat([text_embed(instruct_id), prefill], dim=1)

    return TalkerPrompt(
        prefill=prefill,
        text_track=text_track,
        tts_pad=tts_pad,
        text_tokens=text_tokens,
        ref_codes=ref_codes,
    )

