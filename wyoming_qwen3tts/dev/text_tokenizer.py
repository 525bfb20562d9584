"""A small Qwen2-style byte-level BPE text tokenizer, trained offline for test checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
)

# Qwen2's pre-tokenizer split: "\n" never joins the letters that follow it.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
assistant user assistant user assistant
Hello, how are you today? The weather is nice and the lights in the kitchen are on.
Turn off the living room lamp. Set a timer for ten minutes. What time is it?
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Home Assistant speaks through a voice satellite in every room of the house.
It is twenty one degrees inside and fourteen degrees outside, with light rain expected tonight.
Guten Morgen! Bonjour, comment allez-vous? Buenos dias. Buongiorno. Bom dia.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ! ? ; : - ' " ( ).
"""


@dataclass(frozen=True)
class TinyTokenIds:
    """Ids of the special tokens in the generated text tokenizer."""

    endoftext: int
    im_start: int
    im_end: int
    tts_pad: int
    tts_bos: int
    tts_eos: int
    assistant: int  # the role word of the chat template (the published configs name its id)
    vocab_size: int


def write_text_tokenizer(out: Path, vocab_size: int = 600) -> TinyTokenIds:
    """Train a small Qwen2-style byte-level BPE offline and save it as the package loads it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2TokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    fast = Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    fast.save_pretrained(str(out))

    # The package slices its chat template by position: these must each be one token.
    for piece in ("assistant", "\n", "user"):
        ids = fast(piece)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits {piece!r} into {ids}; the package needs one token")

    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return TinyTokenIds(
        endoftext=ids["<|endoftext|>"],
        im_start=ids["<|im_start|>"],
        im_end=ids["<|im_end|>"],
        tts_pad=ids["<tts_pad>"],
        tts_bos=ids["<tts_text_bos>"],
        tts_eos=ids["<tts_text_eod>"],
        assistant=fast("assistant")["input_ids"][0],
        vocab_size=len(fast),
    )
