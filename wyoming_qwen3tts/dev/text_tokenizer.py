"""The text tokenizer of a generated checkpoint, in the layout the package loads.

Two kinds:

* a small Qwen2-style byte-level BPE trained offline on a few lines (tiny test checkpoints);
* Qwen's own vocabulary, rebuilt from its BPE ranks (real-size checkpoints for benchmarks: the
  prompts are as long as the real model's).
"""

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
class TextTokenIds:
    """Ids of the special tokens in a generated text tokenizer."""

    endoftext: int
    im_start: int
    im_end: int
    tts_pad: int
    tts_bos: int
    tts_eos: int
    assistant: int  # the role word of the chat template (the published configs name its id)
    vocab_size: int


def _qwen2_byte_level(model):
    """A tokenizer around a BPE ``model`` with Qwen2's normalizer, word split and byte mapping."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def write_text_tokenizer(out: Path, vocab_size: int = 600) -> TextTokenIds:
    """Train a small Qwen2-style byte-level BPE offline and save it as the package loads it."""
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import AddedToken

    tokenizer = _qwen2_byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    return _save(tokenizer, out)


# Where the published checkpoints put their special tokens (their config.json names the
# ids of <|im_start|>, <|im_end|> and the three tts tokens). The ids between them belong to
# Qwen's other special tokens; here they are placeholders, never produced from text.
QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<tts_pad>": 151671,
    "<tts_text_bos>": 151672,
    "<tts_text_eod>": 151673,
}
QWEN_VOCAB_SIZE = 151676  # the published tokenizer's length, special tokens included


def bpe_from_ranks(ranks: dict[bytes, int]):
    """A byte-level BPE that splits words as tiktoken does with these ranks (no special tokens).

    tiktoken joins, anywhere in a word, the adjacent pair whose joined bytes have the lowest
    rank. A BPE model does the same when every split of every ranked token into two ranked
    halves is a merge, ordered by the joined token's rank.
    """
    from tokenizers import models
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    as_text = bytes_to_unicode()

    def text_of(token: bytes) -> str:
        return "".join(as_text[byte] for byte in token)

    vocab = {text_of(token): rank for token, rank in ranks.items()}
    merges = sorted(
        (rank, ranks[token[:cut]], text_of(token[:cut]), text_of(token[cut:]))
        for token, rank in ranks.items()
        for cut in range(1, len(token))
        if token[:cut] in ranks and token[cut:] in ranks
    )
    return _qwen2_byte_level(
        models.BPE(vocab, [(left, right) for _, _, left, right in merges], fuse_unk=False, ignore_merges=True)
    )


def write_qwen_tokenizer(out: Path, ranks: dict[bytes, int]) -> TextTokenIds:
    """Qwen's tokenizer from its BPE ranks (``qwen_vocabulary.read_ranks``), saved as the package loads it."""
    from transformers import AddedToken

    first = min(QWEN_SPECIAL_IDS.values())
    if len(ranks) != first:
        raise ValueError(f"Qwen's vocabulary has {first} ranked tokens, this file {len(ranks)}")
    tokenizer = bpe_from_ranks(ranks)
    by_id = {token_id: name for name, token_id in QWEN_SPECIAL_IDS.items()}
    specials = [by_id.get(i, f"<|qwen_reserved_{i}|>") for i in range(first, QWEN_VOCAB_SIZE)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return _save(tokenizer, out)


def _save(tokenizer, out: Path) -> TextTokenIds:
    """Save as a Qwen2 fast tokenizer and check what the package's chat template needs."""
    from transformers import Qwen2TokenizerFast

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
    return TextTokenIds(
        endoftext=ids["<|endoftext|>"],
        im_start=ids["<|im_start|>"],
        im_end=ids["<|im_end|>"],
        tts_pad=ids["<tts_pad>"],
        tts_bos=ids["<tts_text_bos>"],
        tts_eos=ids["<tts_text_eod>"],
        assistant=fast("assistant")["input_ids"][0],
        vocab_size=len(fast),
    )
